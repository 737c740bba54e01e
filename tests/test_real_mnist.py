"""Learning tests on the real MNIST files in ../shared/data (skipped when absent): each method,
trained briefly with the same small protocol (conftest.REAL_SMALL), must beat ST's robustness."""
from conftest import REAL_SMALL, final_metrics, needs_real_mnist, run_ok


@needs_real_mnist
def test_st_learns_and_at_is_clearly_more_robust(real_st_run, tmp_path):
    st = final_metrics(real_st_run)
    assert st['test_nat'] >= 80.0, st
    run_ok('train_at.py', '--out', tmp_path / 'at', *REAL_SMALL)
    at = final_metrics(tmp_path / 'at')
    assert at['test_adv'] >= st['test_adv'] + 10.0, (at, st)
