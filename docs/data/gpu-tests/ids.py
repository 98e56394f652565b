"""pytest on the test ids of a file, one a line (ids hold spaces, so they do not go through the shell)."""
import sys

import pytest

ids = [line for line in open(sys.argv[1]).read().splitlines() if line]
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-rf", *ids]))
