"""Learning tests on real MNIST (conftest.MNIST_PLACES: ./data, $ADV_MNIST_DIR, ../shared/data; skipped when absent).

One protocol (conftest.REAL: 2 epochs of 2,500 images, PGD(0.3, 5, 0.1)) and one ST run shared
by all (conftest.real_st_run, REAL_ST). Each method must end clearly more robust than ST: ST sits
at 2.0% PGD accuracy on 1 thread, 4.5% on 2 (the suite's default), every working method at 23-37%
(beside each row), a defect at ST's level (AGAIN trained on the clean inputs: 1.0%), so the
margin (conftest.ROBUST_MARGIN, 12 points) is set by the method, not by the thread count
(measured 2026-12-06, torch 2.14.1, a 2-core AMD EPYC).
Each row says what breaks it: a defect that leaves the model as robust as ST fails it.
"""
import pytest
import torch

import common
from conftest import REAL, REAL_DATA, ROBUST_MARGIN, final_metrics, needs_real_mnist, read_log, run_ok


@needs_real_mnist
def test_st_learns(real_st_run):
    # observed: 97.5% natural, 2.0% / 4.5% PGD on 1 / 2 threads. Breaks: a wrong label order, a
    # learning rate that is not applied, a model in eval mode while training (BatchNorm),
    # shuffling that drops data; an attack in ST's training (the methods' 23-37% PGD)
    st = final_metrics(real_st_run)
    assert st['test_nat'] >= 95.0 and st['test_adv'] <= 10.0, st


METHODS = {
    # name: (script, flags, observed PGD accuracy on 1 / 2 threads, what breaks it)
    'at': ('train_at.py', [], (30.5, 24.5),
           'training on the clean inputs (the PGD examples not used)'),
    'jt': ('train_jt.py', [], (29.0, 28.0),
           'the adversarial half not attacked, or its CE term (lambda2) dropped'),
    'trades': ('train_trades.py', [], (23.0, 27.5),
               'the KL term dropped or its attack not ascending the KL'),
    # HFF and the ASE head slow AGAIN's start: without a warmup it ended at 17.5 / 16.5, 12 points
    # above ST's 4.5 on 2 threads, at the margin; epoch 1 at half eps (--eps-warmup 2) clears it
    'again': ('train_again.py', ['--eps-warmup', '2'], (26.5, 36.5),
              'the PGD examples not used in Eq. (7) (clean inputs trained: 1.0 / 1.0)'),
    # SGD at batch 64 and no random start, as the other rows (the paper's Adam / Madry CNN
    # settings are checked by test_at_id_default_run_leaves_chance below)
    'at_id': ('train_att_id.py', ['--model', 'cnn_b', '--optimizer', 'sgd', '--no-random-start'], (26.5, 29.5),
              "Eq. (7)'s CE read on the clean branch instead of x'"),
}


@needs_real_mnist
@pytest.mark.parametrize('name', sorted(METHODS))
def test_method_is_clearly_more_robust_than_st(name, real_st_run, tmp_path):
    script, flags, observed, breaks = METHODS[name]
    run_ok(script, '--out', tmp_path / name, *REAL, *flags)
    st, m = final_metrics(real_st_run), final_metrics(tmp_path / name)
    assert m['test_adv'] >= st['test_adv'] + ROBUST_MARGIN, (name, m, st, f'observed {observed}')


@needs_real_mnist
def test_aelfs_default_trains_from_st_and_the_papers_beta_on_the_literal_norm_collapses(real_st_run, tmp_path):
    init = real_st_run / 'last.pt'
    fc_init = common.load_checkpoint(str(init))['state_dict']['fc.weight']
    # the zero-flag reading and beta (beta 0.1 on ||f||_2): no collapse warning, natural training
    # accuracy far above chance (observed 64-76% in epoch 1, 86-90% in epoch 2), w untouched.
    # Breaks: a norm term that shrinks the embeddings to 0, w updated. AELFs' robustness is not
    # asserted here: after these 78 steps its PGD accuracy ranged from ST's level (3%) to 17%
    # between ST inits, so no margin is set by the method at this budget. What the margin would
    # guard (c trained on the PGD examples of each batch's second half) is checked exactly by
    # test_aelf.py::test_aelfs_trains_c_on_the_pgd_examples_of_each_batchs_second_half, and the
    # README's --quick results measure the robustness (Results)
    run_ok('train_aelfs.py', '--out', tmp_path / 'default', '--init', init, *REAL)
    log = read_log(tmp_path / 'default')
    assert min(r['train_acc_nat'] for r in log) >= 60.0, log
    assert not any(r['collapse_warning'] for r in log), log
    assert torch.equal(common.load_checkpoint(str(tmp_path / 'default' / 'last.pt'))['state_dict']['fc.weight'], fc_init)
    # the paper's beta 0.5 on the literal norm collapses, and says so. Breaks: a silent guard
    proc = run_ok('train_aelfs.py', '--out', tmp_path / 'literal', '--init', init, *REAL,
                  '--feature-norm', 'l2', '--beta', '0.5', '--epochs', '1')     # 40 steps
    assert 'WARNING: the embeddings are collapsing' in proc.stdout, proc.stdout


@needs_real_mnist
def test_at_id_default_run_leaves_chance_within_40_steps(tmp_path):
    # Madry et al.'s settings, the defaults (Adam 1e-4, batch 50, Madry CNN, random start), for
    # 40 steps with a 5-step attack: observed 56% natural test accuracy. Breaks: the former
    # defaults (SGD lr 0.1 at batch 128: 16 steps here, observed 22%) or any optimiser that
    # leaves the model at the plateau of adversarial training
    run_ok('train_att_id.py', '--data-dir', str(REAL_DATA), '--train-size', '2000', '--epochs', '1',
           '--val-size', '0', '--test-size', '300', '--steps', '5', '--step-size', '0.08',
           '--device', 'cpu', '--out', tmp_path / 'atid')
    assert final_metrics(tmp_path / 'atid')['test_nat'] >= 35.0
