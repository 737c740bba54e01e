"""Course kit: make an assignment from any method's equation, and grade it.

    python tests/assignment.py make trades_loss mart_loss --out /tmp/hw
    python tests/assignment.py grade /tmp/hw --json /tmp/hw/results.json

``make`` copies the repository's tracked files into DIR and replaces the body of each named
function (its signature and docstring kept) by a ``# TODO`` naming its equation and a
``raise NotImplementedError``; the copy's README gets an "Assignment" section. ``grade`` runs,
inside DIR only, the oracle tests of each blanked function and the real-MNIST learning test of
its method (skipped, with a line, when MNIST is not found), and prints and writes per function
its tests, passed or failed with the first line of the failure, its points and the total.

FUNCTIONS is the one map from a function to its equation and its tests: the README's
instructors' table, this kit and tests/test_assignment.py all read it.
"""
import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Task:
    file: str                  # where the function lives
    name: str                  # the function (or class: its forward is blanked)
    equation: str              # what the student writes
    tests: tuple               # oracle tests: 'tests/test_x.py::test_y'
    criterion: str             # what the oracle tests check, stated in the grade
    learning: tuple = field(default=())   # real-MNIST learning tests of the method


def _learning(method):
    return (f'tests/test_real_mnist.py::test_method_is_clearly_more_robust_than_st[{method}]',)


AELFS_LEARNING = ('tests/test_real_mnist.py::test_aelfs_default_trains_from_st_and_the_papers_beta_'
                  'on_the_literal_norm_collapses',)

FUNCTIONS = {
    'pgd': Task('attacks.py', 'pgd', "l-inf PGD, the inner max of AELF Eq. (3) (Madry et al. 2018)",
                ('tests/test_attacks.py::test_pgd_stays_in_ball_and_box_and_increases_loss',),
                'every iterate inside the eps-ball and [0, 1]; the loss it ascends increases',
                _learning('at')),
    'cw_margin': Task('attacks.py', 'cw_margin', "the CW margin max_{j != y} z_j - z_y",
                      ('tests/test_attacks.py::test_cw_margin_and_one_cw_step_by_hand',),
                      'the margin and one CW-PGD step equal to values worked out by hand'),
    'at_loss': Task('train_at.py', 'at_loss', "AELF Eq. (3) (AT) and Eq. (1) (ST)",
                    ('tests/test_train_at.py::test_at_loss_is_eq_3_with_pgd_written_independently',),
                    'Eq. (3) oracle: the loss equal to CE on PGD examples written out independently',
                    _learning('at')),
    'jt_loss': Task('train_jt.py', 'jt_loss', "AELF Eq. (4), with JT*'s beta (‖f‖ + ‖f'‖) term",
                    ('tests/test_jt_trades.py::test_jt_loss_is_eq_4_with_any_lambdas_and_the_jtstar_'
                     'term_in_each_reading',),
                    'Eq. (4) oracle: the loss equal to Eq. (4) written out, for any lambdas and each '
                    'reading of the JT* norm term', _learning('jt')),
    'jt_batch': Task('train_jt.py', 'jt_batch', "the half-batch split of AELF Appendix C",
                     ('tests/test_jt_trades.py::test_jt_adversarial_half_is_adversarial',),
                     'the second half of the batch, and only it, replaced by PGD examples',
                     _learning('jt')),
    'train_jt.py:feature_norm': Task(
        'train_jt.py', 'feature_norm', "JT*'s ‖f‖_2 in its readings",
        ('tests/test_jt_trades.py::test_jt_loss_is_eq_4_with_any_lambdas_and_the_jtstar_term_in_each_reading',),
        "Eq. (4) oracle with the JT* term in each reading of the norm"),
    'trades_attack': Task('train_trades.py', 'trades_attack', "TRADES Alg. 1, the inner max of AELF Eq. (5)",
                          ('tests/test_jt_trades.py::test_trades_step_equals_algorithm_1_written_independently',),
                          'Alg. 1 oracle: a whole step (attack, loss and gradients) equal to TRADES '
                          'Algorithm 1 written out independently', _learning('trades')),
    'trades_loss': Task('train_trades.py', 'trades_loss', "AELF Eq. (5): CE(f(x), y) + beta KL(f(x) ‖ f(x'))",
                        ('tests/test_jt_trades.py::test_trades_step_equals_algorithm_1_written_independently',),
                        'Eq. (5) oracle: a whole step (loss and gradients) equal to TRADES Algorithm 1 '
                        'written out independently', _learning('trades')),
    'aelf_step': Task('train_aelf.py', 'aelf_step', "AELF Alg. 1: the update of c, then of w",
                      ('tests/test_aelf.py::test_aelf_step_update_order_and_stop_gradient',),
                      "Alg. 1 oracle: c updated on CE + lambda L2 with f stop-gradient, then w on CE "
                      "of the new c, as written out independently"),
    'embedding_distance': Task('train_aelf.py', 'embedding_distance', "AELF's L2 = distance(f', stopgrad(f))",
                               ('tests/test_aelf.py::test_aelf_distances',),
                               'each distance (l2, l1, mse) equal to its value by hand'),
    'aelfs_loss': Task('train_aelfs.py', 'aelfs_loss', "AELF Eq. (10) with w frozen",
                       ('tests/test_aelf.py::test_aelfs_loss_is_eq_10',
                        'tests/test_aelf.py::test_aelfs_in_script_st_phase_then_frozen_w'),
                       'Eq. (10) oracle: the loss equal to Eq. (10) written out; a run trains with w '
                       'frozen after its ST phase', AELFS_LEARNING),
    'train_aelfs.py:feature_norm': Task(
        'train_aelfs.py', 'feature_norm', "‖f‖_2 of Eq. (10) in its readings",
        ('tests/test_aelf.py::test_feature_norm_readings_on_a_hand_made_embedding',),
        'each reading of the norm equal to its value on a hand-made embedding'),
    'ASEHead': Task('models.py', 'ASEHead', "AGAIN Eq. (4): the ASE weighting of the feature maps",
                    ('tests/test_again.py::test_ase_training_weighting_is_eq_4_on_a_hand_built_head',),
                    'Eq. (4) oracle: the weighted maps equal to Eq. (4) on a hand-built head'),
    'hff': Task('train_again.py', 'hff', "AGAIN Eq. (5)-(6): high-frequency feature mixing (HFF)",
                ('tests/test_again.py::test_hff_mixes_statistics_on_the_simplex',),
                'the mixed statistics on the simplex of Eq. (6), as written out'),
    'adain': Task('train_again.py', 'adain', "AdaIN, Eq. (5)",
                  ('tests/test_again.py::test_hff_mixes_statistics_on_the_simplex',),
                  'the mixed statistics on the simplex of Eq. (6), as written out'),
    'step_loss': Task('train_again.py', 'step_loss', "AGAIN Eq. (7) (supplement Alg. 1, lines 5-8)",
                      ('tests/test_again.py::test_step_loss_is_eq_7_and_plain_steps_use_the_inference_path',),
                      'Eq. (7) oracle: CE(main) + CE(ASE) on an AGAIN step, the inference path on a '
                      'plain step', _learning('again')),
    'use_again': Task('train_again.py', 'use_again', "the i/N schedule of the supplement's Alg. 1",
                      ('tests/test_again.py::test_schedule_share_tracks_i_over_n',),
                      'the share of AGAIN steps follows i/N'),
    'mart_loss': Task('train_again.py', 'mart_loss', "MART (Wang et al. 2020): BCE + lambda KL (1 - p_y(x))",
                      ('tests/test_again.py::test_mart_loss_matches_direct_computation',),
                      "MART oracle: the loss equal to MART's written out directly"),
    'awp_perturbation': Task('train_again.py', 'awp_perturbation', "AWP (Wu et al. 2020): the weight perturbation",
                             ('tests/test_again.py::test_awp_perturbs_by_gamma_along_the_ascent_direction_'
                              'and_is_restored',),
                             'AWP oracle: each layer moved by gamma ||w|| along its ascent direction, '
                             'then restored'),
    'add_to_weights': Task('train_again.py', 'add_to_weights', "AWP: adding and removing the perturbation",
                           ('tests/test_again.py::test_awp_perturbs_by_gamma_along_the_ascent_direction_'
                            'and_is_restored',),
                           'AWP oracle: each layer moved by gamma ||w|| along its ascent direction, '
                           'then restored'),
    'att_id_loss': Task('train_att_id.py', 'att_id_loss', "AT-att-id Eq. (7): CE(x') + lambda ‖z(x) - z(x')‖²",
                        ('tests/test_att_id.py::test_id_loss_is_eq_7_and_reaches_both_branches',),
                        'Eq. (7) oracle: the loss equal to Eq. (7) written out; its gradient reaches '
                        'both branches', _learning('at_id')),
    'AttentionPool': Task('models.py', 'AttentionPool', "AT-att-id Eq. (3)-(5): the attended feature",
                          ('tests/test_att_id.py::test_attended_feature_is_the_weighted_sum_on_a_hand_made_input',),
                          'Eq. (3)-(5) oracle: the attended feature equal to the weighted sum on a '
                          'hand-made input'),
}


class KitError(Exception):
    """Printed as one line."""


def resolve(name):
    """The key of FUNCTIONS that ``name`` ('trades_loss', or 'train_jt.py:feature_norm') names."""
    if name in FUNCTIONS:
        return name
    matches = [key for key, t in FUNCTIONS.items() if t.name == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise KitError(f"{name} is in several scripts: name one of {', '.join(matches)}")
    raise KitError(f"unknown function {name!r}; the known ones: {', '.join(FUNCTIONS)}")


def find_definition(source, name):
    """The ast node of the top-level function, or of the ``forward`` of the top-level class."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
        if isinstance(node, ast.ClassDef) and node.name == name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == 'forward':
                    return item
    return None


def blank(source, task):
    """``source`` with the body of ``task``'s function replaced by a TODO and a raise."""
    node = find_definition(source, task.name)
    if node is None:
        raise KitError(f"{task.name} not found in {task.file}")
    body = node.body
    keep = 1 if (isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], 'value', None), ast.Constant)
                 and isinstance(body[0].value.value, str)) else 0
    lines = source.splitlines(keepends=True)
    first = body[keep].lineno - 1 if keep < len(body) else body[-1].end_lineno
    indent = ' ' * (node.col_offset + 4)
    todo = [f"{indent}# TODO: write {task.equation}.\n",
            f"{indent}# Graded by `python tests/assignment.py grade .`: {task.criterion}.\n",
            f"{indent}raise NotImplementedError('{task.name}: {task.equation.replace(chr(39), chr(34))}')\n"]
    return ''.join(lines[:first] + todo + lines[node.end_lineno:])


def tracked_files(root):
    try:
        out = subprocess.run(['git', 'ls-files'], cwd=root, capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):       # not a git clone: the files on disk
        skip = {'.git', 'runs', 'data', '__pycache__', '.pytest_cache'}
        return [str(p.relative_to(root)) for p in sorted(root.rglob('*'))
                if p.is_file() and not (set(p.relative_to(root).parts) & skip)]


def assignment_section(keys):
    rows = '\n'.join(f"| `{FUNCTIONS[k].file}:{FUNCTIONS[k].name}` | {FUNCTIONS[k].equation} | "
                     f"{FUNCTIONS[k].criterion} |" for k in keys)
    return f"""# Assignment

Fill in the functions below: each keeps its signature and docstring, and its body is a `# TODO`
and a `raise NotImplementedError`. Read the paper's equation beside the script, write the body,
then grade your work from this folder:

    python tests/assignment.py grade . --json results.json

| function | what to write | pass criterion (its oracle tests) |
|---|---|---|
{rows}

Each function earns one point per oracle test it passes, and one more for its method's
real-MNIST learning test where there is one (run only when MNIST is found: `./data`,
`$ADV_MNIST_DIR` or `../shared/data`; otherwise it is skipped and not counted).

"""


def make(names, out):
    keys = [resolve(n) for n in names]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise KitError(f"{out} exists and is not empty: choose another --out")
    files = tracked_files(ROOT)
    sources = {}
    for key in keys:
        task = FUNCTIONS[key]
        sources[task.file] = blank(sources.get(task.file) or (ROOT / task.file).read_text(), task)
    for rel in files:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in sources:
            dst.write_text(sources[rel])
        else:
            shutil.copy2(ROOT / rel, dst)
    readme = out / 'README.md'
    readme.write_text(assignment_section(keys) + readme.read_text())
    (out / '.assignment.json').write_text(json.dumps({'functions': keys}, indent=1))
    print(f"wrote {out}: {len(files)} files, blanked {', '.join(keys)}; grade with: "
          f"python tests/assignment.py grade {out}")


def _first_line(text):
    for line in (text or '').splitlines():
        if line.strip():
            return line.strip()[:200]
    return ''


def _junit_results(xml_path):
    """{'tests/test_x.py::test_y[p]': (passed True/False/None for skipped, message)}."""
    results = {}
    for case in ET.parse(xml_path).getroot().iter('testcase'):
        module = case.get('classname', '')
        path = module.replace('.', '/') + '.py'
        node = f"{path}::{case.get('name')}"
        failure = case.find('failure') if case.find('failure') is not None else case.find('error')
        skipped = case.find('skipped')
        if failure is not None:
            results[node] = (False, _first_line(failure.get('message')) or _first_line(failure.text))
        elif skipped is not None:
            results[node] = (None, 'skipped: ' + _first_line(skipped.get('message')))
        else:
            results[node] = (True, '')
    return results


def grade(folder, json_path=None, learning=True, timeout=3600):
    folder = Path(folder).resolve()
    meta = folder / '.assignment.json'
    if not meta.is_file():
        raise KitError(f"{folder} is not an assignment made by 'tests/assignment.py make' (no .assignment.json)")
    keys = json.loads(meta.read_text())['functions']
    unknown = [k for k in keys if k not in FUNCTIONS]
    if unknown:
        raise KitError(f"{meta} names functions this kit does not know: {', '.join(unknown)}")
    def tests_of(task):
        return task.tests + (task.learning if learning else ())
    nodes = sorted({n for k in keys for n in tests_of(FUNCTIONS[k])})
    changed = [n.split('::')[0] for n in nodes if (ROOT / n.split('::')[0]).is_file()
               and (folder / n.split('::')[0]).is_file()
               and (ROOT / n.split('::')[0]).read_bytes() != (folder / n.split('::')[0]).read_bytes()]
    for path in sorted(set(changed)):
        print(f"warning: {folder / path} differs from the kit's {ROOT / path}: the grade uses the "
              f"folder's tests", file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTEST_ADDOPTS')}
    env['ADV_MNIST_DIR'] = env.get('ADV_MNIST_DIR') or _mnist_for_students(folder)
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / 'junit.xml'
        # in DIR, on DIR's files only: its conftest puts DIR first on sys.path
        cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '--rootdir', str(folder),
               f'--junitxml={xml}', '-o', 'junit_family=xunit1', *nodes]
        done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        if not xml.is_file():
            raise KitError(f"pytest did not run in {folder}: {_first_line(done.stderr) or _first_line(done.stdout)}")
        results = _junit_results(xml)
    report = {'functions': {}, 'total': 0, 'max': 0}
    for key in keys:
        task, tests, points, most = FUNCTIONS[key], [], 0, 0
        for node in tests_of(task):
            passed, message = results.get(node, (False, 'not run: pytest could not collect it (a syntax or import error?)'))
            tests.append({'name': node, 'passed': passed, 'message': message})
            if passed is not None:
                most += 1
                points += bool(passed)
        report['functions'][key] = {'points': points, 'max': most, 'criterion': task.criterion,
                                    'tests': tests}
        report['total'] += points
        report['max'] += most
    for key, r in report['functions'].items():
        print(f"{key} ({FUNCTIONS[key].file}): {r['points']}/{r['max']} - pass criterion: {r['criterion']}")
        for t in r['tests']:
            mark = {True: 'passed', False: 'FAILED', None: 'skipped'}[t['passed']]
            print(f"  {mark:7} {t['name']}" + (f"\n          {t['message']}" if t['message'] else ''))
    print(f"total: {report['total']}/{report['max']}")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
        print(f"wrote {json_path}")
    return report


def _mnist_for_students(folder):
    """Where the learning tests find MNIST: the folder's ./data, else the instructor's copy."""
    for candidate in (folder / 'data', ROOT / 'data', ROOT.parent / 'shared' / 'data'):
        if (candidate / 'MNIST' / 'raw').is_dir():
            return str(candidate)
    return ''


def instructors_table():
    """The README's instructors' table, rendered from FUNCTIONS (tests/test_assignment.py checks
    that the README holds exactly this)."""
    def ids(nodes):
        return '<br>'.join(f"`{n}`" for n in nodes) or '-'
    rows = [f"| `{key}` | `{t.file}` | {t.equation} | {ids(t.tests)} |" for key, t in FUNCTIONS.items()]
    return '\n'.join(['| function | script | equation | oracle tests |', '|---|---|---|---|', *rows])


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    m = sub.add_parser('make', help='a copy of the repository with FUNCTIONs blanked')
    m.add_argument('functions', nargs='+', metavar='FUNCTION', help=f"any of: {', '.join(FUNCTIONS)}")
    m.add_argument('--out', required=True, help='folder for the assignment (new or empty)')
    g = sub.add_parser('grade', help='run the oracle and learning tests of the blanked functions in DIR')
    g.add_argument('folder', metavar='DIR')
    g.add_argument('--json', help='also write the grade to this JSON file')
    g.add_argument('--oracle-only', action='store_true',
                   help="only the oracle tests (seconds), not the real-MNIST learning tests (minutes)")
    sub.add_parser('table', help="print the README's instructors' table from the map")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == 'table':
        print(instructors_table())
        return
    try:
        if args.command == 'make':
            make(args.functions, args.out)
        else:
            grade(args.folder, args.json, learning=not args.oracle_only)
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
