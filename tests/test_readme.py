"""The README stays true at HEAD: every command it shows parses with the script's own parser,
every flag of the flags table exists with the default it states, and it stays short."""
import contextlib
import importlib
import io
import re
import shlex

import pytest

from conftest import ROOT

README = (ROOT / 'README.md').read_text()
SCRIPTS = {f'{n}.py': n for n in ('train_at', 'train_jt', 'train_trades', 'train_aelf', 'train_aelfs',
                                  'train_again', 'train_att_id', 'eval')}


def _bash_lines(text):
    """Each command line of the ```bash blocks, with the block's shell variables expanded (a
    for loop's variable takes its first value)."""
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        env = {}
        for raw in block.splitlines():
            for part in re.split(r';\s*|&&', raw.split(' # ')[0]):
                part = part.strip()
                loop = re.match(r'for (\w+) in (\S+)', part)
                if loop:
                    env[loop.group(1)] = loop.group(2)
                    continue
                assign = re.fullmatch(r'(\w+)=(".*"|\S+)', part)
                expand = lambda s: re.sub(r'\$\{?(\w+)\}?', lambda m: env.get(m.group(1), m.group(0)), s)
                if assign:
                    env[assign.group(1)] = expand(assign.group(2).strip('"'))
                elif part and part not in ('do', 'done'):
                    yield expand(part)


def _inline_commands(text):
    """`python X.py ...` spans outside the code blocks (tables, prose)."""
    prose = re.sub(r'```.*?```', '', text, flags=re.S)
    for span in re.findall(r'`(python [^`]+)`', prose):
        for part in span.split(' / '):              # "`cmd a` / `cmd b`" cells hold one each
            yield part.strip()


def commands(text):
    """(script, argv) of every python command the README shows."""
    out = []
    for line in list(_bash_lines(text)) + list(_inline_commands(text)):
        words = shlex.split(line, comments=True)
        if words[:1] == ['torchrun']:       # torchrun's own options, then the script and its flags
            first = next((i for i, w in enumerate(words) if w.endswith('.py')), len(words))
            words = ['python', *words[first:]]
        if len(words) >= 2 and words[0] == 'python' and (words[1] in SCRIPTS or words[1] == 'tests/assignment.py'):
            out.append((words[1], words[2:]))
    return out


def _parse(script, argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            if script == 'tests/assignment.py':
                import assignment
                assignment.build_parser().parse_args(argv)
            else:
                importlib.import_module(SCRIPTS[script]).parse_args(argv)
        except SystemExit as e:
            if e.code:
                return err.getvalue().strip().splitlines()[-1]
    return None


def test_every_command_of_the_readme_parses_with_its_script_at_head():
    found = commands(README)
    assert len(found) >= 30 and {s for s, _ in found} >= set(SCRIPTS) | {'tests/assignment.py'}, found
    bad = [(s, ' '.join(a), e) for s, a in found if (e := _parse(s, a))]
    assert not bad, bad


def test_the_check_catches_a_flag_a_script_does_not_take():
    broken = README.replace('python train_at.py --dataset mnist --quick --standard',
                            'python train_at.py --dataset mnist --quick --standrad', 1)
    assert broken != README
    errors = [e for s, a in commands(broken) if (e := _parse(s, a))]
    assert len(errors) == 1 and '--standrad' in errors[0], errors


def test_the_check_reads_the_torchrun_lines():
    lines = [line for line in _bash_lines(README) if line.startswith('torchrun ')]
    assert len(lines) >= 2
    broken = README.replace(lines[0], lines[0].replace('--dataset', '--datset'), 1)
    errors = [e for s, a in commands(broken) if (e := _parse(s, a))]
    assert len(errors) == 1 and '--datset' in errors[0], errors


def _flags_table():
    section = README[README.index('## Common flags'):]
    section = section[:section.index('\n## ', 1)]
    rows = [r for r in section.splitlines() if r.startswith('| `--')]
    assert len(rows) >= 12
    return rows


def test_every_flag_of_the_flags_table_exists_with_the_default_it_states():
    import common
    resolved = {}
    for script in SCRIPTS:
        if script == 'eval.py':
            continue
        module = importlib.import_module(SCRIPTS[script])
        with contextlib.redirect_stdout(io.StringIO()):
            resolved[script] = [vars(module.parse_args(argv)) for argv in ([], ['--dataset', 'cifar10'])]
    for row in _flags_table():
        first, meaning = row.split(' | ')[0], row.split(' | ', 1)[1]
        flags = re.findall(r'--[a-z0-9-]+', first)
        for flag in re.findall(r'--[a-z0-9-]+', first):
            dest = flag[2:].replace('-', '_')
            for script, values in resolved.items():
                assert dest in values[0], (script, flag)
        stated = re.search(r'\(default:? `?([^`),;:]+)`?', meaning)
        if stated:
            dest = re.findall(r'--[a-z0-9-]+', first)[0][2:].replace('-', '_')
            # a script whose own protocol differs is named in the row ("AGAIN: 4")
            named = {s for s, name in (('train_again.py', 'AGAIN:'), ('train_att_id.py', 'AT-id:')) if name in meaning}
            for script, values in resolved.items():
                if script in named:
                    continue
                shown = {str(v[dest]) for v in values} | {f'{v[dest]:g}' for v in values
                                                          if isinstance(v[dest], (int, float)) and not isinstance(v[dest], bool)}
                assert stated.group(1).strip() in shown, (script, row, shown)
        assert flags


def test_the_readme_is_short_and_self_sufficient():
    assert len(README.encode()) < 38 * 1024
    for stale in ('../shared/papers', 'git checkout', '--eval-size'):
        assert stale not in README, stale
    refs = README[README.index('## References'):]
    assert refs.count('](https://') >= 9
