"""docs/errors.md cannot drift: its probe table is generated from tests/fuzz_probes.py (whose probes
test_fuzz_crash.py runs) and its environment table from bnbcy._env.VARIABLES."""
import pathlib
import re

import fuzz_probes

from bnbcy import _arrays, _env

DOC = pathlib.Path(__file__).parent.parent / "docs" / "errors.md"


def _block(text, name):
    m = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert m, f"docs/errors.md lacks the <!-- {name}:begin/end --> block"
    return m.group(1).strip()


def test_probe_table_matches_probes():
    want = fuzz_probes.render_table()
    assert _block(DOC.read_text(), "probes") == want, \
        "docs/errors.md's table is stale; regenerate it with: python tests/fuzz_probes.py --table"


def test_env_table_matches_variables():
    assert _block(DOC.read_text(), "env") == _env.describe(), \
        "docs/errors.md's environment table is stale; regenerate it with: python -c 'from bnbcy import _env; " \
        "print(_env.describe())'"


def test_documented_limits_are_the_code_limits():
    text = DOC.read_text()
    assert f"MAX_BLOCKSIZE = 2**31 - 1" in text and _arrays.MAX_BLOCKSIZE == 2 ** 31 - 1
    assert f"MAX_NUMEL = 2**62" in text and _arrays.MAX_NUMEL == 2 ** 62
    assert str(_env.POOL_MB_MAX) in text
