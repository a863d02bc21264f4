"""The optimizer step's cached layouts on the CUDA launch path (a GPU, or the SIMT emulator with
``BNBCY_EMULATE_CUDA=1``): a step that reuses what an earlier step checked behaves exactly as one
that checks everything again (tests/test_optim_overhead.py, on cuda_env.DEVICE)."""
import pytest

import bnbcy as bnb
from cuda_env import DEVICE
from test_optim_overhead import RAISES, _both, _grad_shape, _load_state_dict, _lr, _new_grads, _reassign, \
    _state_moved, _state_resized, _step_edited

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("change", [_new_grads, _reassign, _grad_shape, _lr, _state_moved, _state_resized,
                                    _step_edited, _load_state_dict], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("cls,kw", [(bnb.optim.Adam8bit, {"min_8bit_size": 0}), (bnb.optim.LAMB32bit, {})],
                         ids=lambda x: getattr(x, "__name__", ""))
def test_cached_step_equals_full_check_cuda(cls, kw, change):
    err = _both(change, DEVICE)(cls, kw)
    assert (err is not None) == (change in RAISES), err
