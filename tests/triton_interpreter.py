"""Triton's interpreter, sped up for the suite. Triton 3.9's interpreter patches the language modules visible
from a device function (a `@triton.jit` function called inside a kernel) at every call, an `inspect.getmembers`
over `tl`, `tl.core`, `tl.math` and the tensor class that finds nothing left to patch after the first call of
the launch (a patched member is no longer a builtin). Kernels that call helpers in their loops spent about
half their interpreted time there. Here a device call patches once per launch and module."""

import inspect


def patch_device_calls_once_per_launch() -> bool:
    """Install the shortcut where the interpreter is the one described above; False (nothing changed) elsewhere."""
    import triton.runtime.interpreter as interpreter

    launch, device_call = interpreter.GridExecutor.__call__, interpreter.InterpretedFunction.__call__
    if getattr(device_call, "patched_once_per_launch", False):
        return True
    if "_patch_lang(self.fn)" not in inspect.getsource(device_call) or not hasattr(interpreter, "_patch_lang"):
        return False
    patched_in_launch: list[set[int]] = []  # per launch in flight, the modules (globals) already patched

    def run_launch(self, *args, **kwargs):
        patched_in_launch.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched_in_launch.pop()

    def call_device_function(self, *args, **kwargs):
        module = id(self.fn.__globals__)
        if not patched_in_launch or module not in patched_in_launch[-1]:
            if patched_in_launch:
                patched_in_launch[-1].add(module)
            return device_call(self, *args, **kwargs)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as exc:
            raise interpreter.InterpreterError(repr(exc)) from exc

    call_device_function.patched_once_per_launch = True
    interpreter.GridExecutor.__call__ = run_launch
    interpreter.InterpretedFunction.__call__ = call_device_function
    return True
