"""A pytest plugin that lists the tests this machine skips for want of a GPU (a skipif mark whose condition
is true at collection) into .gpu/gpu_tests.txt, id and reason a line, for docs/data/gpu-tests/run.sh:
`PYTHONPATH=docs/data/gpu-tests python -m pytest --co -q -p gpu_list`."""

from pathlib import Path


def pytest_collection_modifyitems(session, config, items):
    rows = []
    for item in items:
        for mark in item.iter_markers("skipif"):
            condition = mark.args[0] if mark.args else mark.kwargs.get("condition")
            if condition is True:
                rows.append(f"{item.nodeid}\t{mark.kwargs.get('reason', '')}")
                break
    Path(".gpu").mkdir(exist_ok=True)
    Path(".gpu/gpu_tests.txt").write_text("\n".join(rows) + "\n")
