"""How ``--program`` names resolve: built-in names, user modules, ``module:Factory``, and clear errors."""

import textwrap

import pytest

from programs.base import resolve

USER = textwrap.dedent('''
    import types

    import dspy

    from programs.base import Splits

    def Program(style="short"):
        program = dspy.Predict("question -> answer")
        program.style = style
        return program

    def load_splits(seed=0, n=4):
        examples = [dspy.Example(question=str(i), answer=str(i)).with_inputs("question") for i in range(n)]
        return Splits(examples[:1], examples[1:2], examples[2:])

    def metric(example, prediction, trace=None):
        return example.answer == prediction.answer

    def Factory():
        return types.SimpleNamespace(Program=Program, load_splits=load_splits, metric=metric)

    half = types.SimpleNamespace(Program=Program)
    broken = 3
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_tasks"


def test_builtin_name():
    spec = resolve("iris")
    assert spec.name == "iris" and len(spec.splits(0).test) == 50
    assert type(spec.program()).__name__ == "ChainOfThought"


@pytest.mark.parametrize("name", ["my_tasks", "my_tasks:Factory"])
def test_user_module_and_factory(user_module, name):
    spec = resolve(name)
    assert spec.program(style="long").style == "long"
    assert len(spec.splits(0, n=6).test) == 4


def test_errors_name_the_problem(user_module):
    with pytest.raises(ValueError, match="unknown program 'nope': no module programs.nope or nope"):
        resolve("nope")
    with pytest.raises(ValueError, match="module my_tasks has no attribute 'Missing'"):
        resolve("my_tasks:Missing")
    with pytest.raises(ValueError, match=r"lacks \['load_splits', 'metric'\]"):
        resolve("my_tasks:half")
    with pytest.raises(ValueError, match=r"lacks \['Program', 'load_splits', 'metric'\]"):
        resolve("my_tasks:broken")
    with pytest.raises(ValueError, match="cannot be empty"):
        resolve(" ")


def test_a_program_whose_own_import_fails_says_so(tmp_path, monkeypatch):
    (tmp_path / "needs_dep.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="not_installed_dependency_xyz"):
        resolve("needs_dep")
