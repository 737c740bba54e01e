"""The course kit (tests/assignment.py): one map from function to tests, shared by the README's
instructors' table; make blanks exactly the named functions; grade scores them in the folder."""
import ast
import json
import re
import subprocess
import sys

import pytest

import assignment
from conftest import ROOT


def _test_exists(node):
    path, name = node.split('::')
    name = name.split('[')[0]
    tree = ast.parse((ROOT / path).read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


def test_every_function_and_test_of_the_map_exists_and_the_readme_table_is_the_map():
    for key, task in assignment.FUNCTIONS.items():
        assert assignment.find_definition((ROOT / task.file).read_text(), task.name), key
        for node in task.tests + task.learning:
            assert _test_exists(node), (key, node)
        assert task.tests, key
    readme = (ROOT / 'README.md').read_text()
    assert assignment.instructors_table() in readme
    # and every row of it names a function of the map and tests that exist
    table = readme[readme.index('| function | script | equation |'):].split('\n\n')[0]
    rows = [r for r in table.splitlines()[2:] if r.startswith('|')]
    assert len(rows) == len(assignment.FUNCTIONS)
    for row in rows:
        name = re.match(r'\| `([^`]+)`', row).group(1)
        assert name in assignment.FUNCTIONS, row
        assert all(_test_exists(n) for n in re.findall(r'`(tests/[^`]+::[^`]+)`', row)), row


def test_unknown_and_ambiguous_names_give_one_line_listing_the_known_ones(tmp_path, capsys):
    for name, expected in (('foo', 'the known ones: pgd, cw_margin'), ('feature_norm', 'in several scripts')):
        with pytest.raises(SystemExit) as e:
            assignment.main(['make', name, '--out', str(tmp_path / 'x')])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / 'x').exists()


def test_make_blanks_exactly_the_named_functions_keeping_signature_and_docstring(tmp_path):
    out = tmp_path / 'hw'
    assignment.make(['trades_loss', 'ASEHead'], out)
    src, ref = (out / 'train_trades.py').read_text(), (ROOT / 'train_trades.py').read_text()
    node = assignment.find_definition(src, 'trades_loss')
    original = assignment.find_definition(ref, 'trades_loss')
    assert ast.unparse(node.args) == ast.unparse(original.args)
    assert ast.get_docstring(node) == ast.get_docstring(original)
    assert isinstance(node.body[-1], ast.Raise) and 'NotImplementedError' in ast.unparse(node.body[-1])
    assert '# TODO: write AELF Eq. (5)' in src
    # nothing else changed: the other functions of the file, the other files
    for other in ('trades_attack', 'kl_clean_adv', 'main'):
        assert ast.dump(assignment.find_definition(src, other)) == ast.dump(assignment.find_definition(ref, other))
    forward = assignment.find_definition((out / 'models.py').read_text(), 'ASEHead')
    assert forward.name == 'forward' and isinstance(forward.body[-1], ast.Raise)
    assert (out / 'train_again.py').read_text() == (ROOT / 'train_again.py').read_text()
    readme = (out / 'README.md').read_text()
    assert readme.startswith('# Assignment') and 'python tests/assignment.py grade .' in readme
    assert '`train_trades.py:trades_loss`' in readme and '`models.py:ASEHead`' in readme
    assert not (out / 'runs').exists() and (out / 'tests' / 'conftest.py').is_file()


def test_grade_gives_zero_to_a_blank_full_marks_to_the_reference_and_catches_a_subtle_error(tmp_path):
    out = tmp_path / 'hw'
    assignment.make(['trades_loss', 'mart_loss', 'att_id_loss'], out)
    # the student pastes the reference trades_loss back, writes MART's weight from the
    # adversarial probabilities instead of the natural ones, and leaves att_id_loss blank
    (out / 'train_trades.py').write_text((ROOT / 'train_trades.py').read_text())
    again = (ROOT / 'train_again.py').read_text()
    wrong = 'p_true = probs_adv.gather(1, y[:, None]).squeeze(1)'
    assert again.count('p_true = probs_nat.gather(1, y[:, None]).squeeze(1)') == 1
    (out / 'train_again.py').write_text(again.replace('p_true = probs_nat.gather(1, y[:, None]).squeeze(1)', wrong))
    js = tmp_path / 'r.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'tests' / 'assignment.py'), 'grade', str(out),
                           '--json', str(js), '--oracle-only'], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(js.read_text())
    points = {k: (f['points'], f['max']) for k, f in report['functions'].items()}
    assert points == {'trades_loss': (1, 1), 'mart_loss': (0, 1), 'att_id_loss': (0, 1)}, proc.stdout
    assert (report['total'], report['max']) == (1, 3)
    att = report['functions']['att_id_loss']['tests'][0]
    assert att['passed'] is False and 'NotImplementedError' in att['message']
    mart = report['functions']['mart_loss']['tests'][0]
    assert mart['name'] == 'tests/test_again.py::test_mart_loss_matches_direct_computation' and mart['message']
    assert 'pass criterion: MART oracle' in proc.stdout and 'total: 1/3' in proc.stdout
