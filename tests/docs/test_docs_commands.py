"""Every command, key, module and public name the README and the docs show exists in the code."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from docs_helpers import ROOT, code_blocks, inline_code, pages, read, rel, shell_lines

import mallowspo_fast as mpf

PAGES = pages()
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")


def _console_scripts() -> dict[str, str]:
    """name -> module:function of setup.py's console_scripts."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    scripts: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[\w-]+=[\w.]+:\w+",
                                                                                             node.value):
            name, target = node.value.split("=")
            scripts[name] = target
    return scripts


SCRIPTS = _console_scripts()


def _commands() -> list[tuple[str, str]]:
    """(page, command line) of every command shown, placeholders in brackets removed."""
    out = []
    for page in PAGES:
        for line in shell_lines(read(page)):
            line = re.sub(r"\[[^\]]*\.\.\.\]", "", line).strip()
            if line:
                out.append((rel(page), line))
    return out


COMMANDS = _commands()


def _argv_after(tokens: list[str], marker: int) -> list[str]:
    return tokens[marker + 1:]


def _trainer_argvs() -> list[tuple[str, str, list[str]]]:
    """(page, line, argv) of every mallowspo-train command (direct, python -m, deepspeed, torchrun)."""
    out = []
    for page, line in COMMANDS:
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        for i, tok in enumerate(tokens):
            if tok == "mallowspo-train" or (tok == "mallowspo_fast.train" and i > 0
                                            and tokens[i - 1] in ("-m", "--module")):
                out.append((page, line, _argv_after(tokens, i)))
                break
    return out


def test_console_scripts_are_known() -> None:
    assert set(SCRIPTS) >= {"mallowspo-train", "mallowspo-data"}, SCRIPTS
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        assert importlib.util.find_spec(module) is not None, f"{name} -> {module} does not exist"
        mod = importlib.import_module(module)
        assert callable(getattr(mod, func, None)), f"{name} -> {target}: no function {func}"


def test_shown_commands_were_found() -> None:
    """The parser sees the commands (guards the other tests against parsing nothing)."""
    assert any("make demo" in c for _, c in COMMANDS)
    assert any(c.startswith("python -m benchmarks") for _, c in COMMANDS)
    assert len(_trainer_argvs()) >= 5


def test_make_targets_exist() -> None:
    missing = []
    for page, line in COMMANDS:
        for target in re.findall(r"(?:^|&&\s*|;\s*)make ([\w-]+)", line):
            if not re.search(rf"^{re.escape(target)}:", MAKEFILE, re.M):
                missing.append((page, f"make {target}"))
    assert not missing, f"make targets shown in the docs but absent from the Makefile: {missing}"


def _module_files(module: str) -> list[Path]:
    """Source files whose text may define the module's command-line flags: its top-level package."""
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    assert spec is not None and spec.origin, top
    origin = Path(spec.origin)
    return sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]


def test_python_modules_and_their_flags_exist() -> None:
    """Every ``python -m X`` (or ``-m X`` / ``--module X``) names a module; its ``--flags`` appear in its
    package's source (for mallowspo_fast.train, the trainer test below checks the keys)."""
    problems = []
    checked = 0
    for page, line in COMMANDS:
        for m in re.finditer(r"(?:^|\s)(?:-m|--module)\s+([\w.]+)(.*?)(?=&&|;|\||$)", line):
            module, rest = m.group(1), m.group(2)
            if module in ("pip", "venv"):
                continue
            checked += 1
            if importlib.util.find_spec(module) is None:
                problems.append((page, f"module {module} does not exist"))
                continue
            if module in ("pytest", "mallowspo_fast.train", "mallowspo_fast.data"):
                continue
            source = "\n".join(p.read_text(encoding="utf-8") for p in _module_files(module))
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                if f'"{flag}"' not in source and f"'{flag}'" not in source:
                    problems.append((page, f"python -m {module}: flag {flag} is not defined"))
    assert checked >= 10, f"only {checked} python -m commands found"
    assert not problems, problems


def test_trainer_commands_use_real_keys() -> None:
    from mallowspo_fast.trainer.cli import parse_args
    from mallowspo_fast.trainer.config import FIELDS

    problems = []
    for page, line, argv in _trainer_argvs():
        try:
            args = parse_args(argv)
        except ValueError as e:
            problems.append((page, line, str(e)))
            continue
        for key, _ in args.overrides:
            if key.split(".")[0] not in FIELDS:
                problems.append((page, line, f"unknown key {key!r}"))
        if args.config and args.config.endswith(".yaml") and args.config.startswith("configs/"):
            if not (ROOT / args.config).is_file():
                problems.append((page, line, f"{args.config} does not exist"))
    assert not problems, problems


def test_data_cli_commands_parse() -> None:
    from mallowspo_fast.data.cli import build_parser

    parser = build_parser()
    seen = 0
    for page, line in COMMANDS:
        tokens = shlex.split(line)
        for i, tok in enumerate(tokens):
            if tok == "mallowspo-data" or (tok == "mallowspo_fast.data" and i > 0 and tokens[i - 1] == "-m"):
                argv = tokens[i + 1:]
                if not argv or argv[0].startswith("-"):
                    break
                seen += 1
                try:
                    parser.parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{page}: `{line}` is not a valid mallowspo-data command")
                break
    assert seen >= 5, f"only {seen} mallowspo-data commands found"


def test_config_files_shown_exist() -> None:
    missing = []
    for page in PAGES:
        for path in set(re.findall(r"\bconfigs/[\w.-]+\.ya?ml\b", read(page))):
            if not (ROOT / path).is_file():
                missing.append((rel(page), path))
    assert not missing, missing


def test_repository_paths_in_code_spans_exist() -> None:
    """`mallowspo_fast/...`, `benchmarks/...`, `tests/...` and the like name files or folders that exist."""
    missing = []
    prefixes = ("mallowspo_fast/", "csrc_triton/", "benchmarks/", "experiments/", "tests/", "configs/", ".ci/")
    for page in PAGES:
        for span in inline_code(read(page)):
            span = span.split("::", 1)[0].strip()
            if span.startswith(prefixes) and re.fullmatch(r"[\w./-]+", span) and "<" not in span:
                if not (ROOT / span).exists():
                    missing.append((rel(page), span))
    assert not missing, f"paths shown in the docs that do not exist: {missing}"


def test_mpf_calls_name_public_functions() -> None:
    names: dict[str, str] = {}
    for page in PAGES:
        text = read(page)
        for name in re.findall(r"\bmpf\.(\w+)\(", text):
            names.setdefault(name, rel(page))
    assert len(names) >= 10, names
    missing = {n: p for n, p in names.items() if not hasattr(mpf, n) or n not in mpf.__all__}
    assert not missing, f"the docs call mpf.X for names the package does not export: {missing}"


def test_data_calls_name_public_functions() -> None:
    from mallowspo_fast import data

    missing = []
    for page in PAGES:
        for lang, body in code_blocks(read(page)):
            if lang != "python" or "from mallowspo_fast import data" not in body and "data." not in body:
                continue
            for name in re.findall(r"(?<![\w.])data\.(\w+)\(", body):
                if name not in data.__all__:
                    missing.append((rel(page), name))
    assert not missing, missing
