"""Every snippet in ``README.md`` runs as pasted, and its shell commands name real things.

Each ```` ```python ```` block runs in a fresh namespace, in a fresh temporary working
directory. A block may be preceded by one marker line that the reader sees in the source:

- ``<!-- snippet: fragment -->``: deliberately partial (a method shown outside its class);
  the block must also show it (a leading ``# ...`` comment) and is the only kind skipped.
- ``<!-- snippet: after rlnorm fit --config configs/X.yaml -->``: runs in a directory where
  that command (shortened to a few rollouts) has just run, so the ``runs/...`` paths it uses
  are the ones the command really writes.

```` ```bash ```` blocks are checked without running them: ``rlnorm`` subcommands and options
against ``rlnorm <cmd> --help``, ``python`` scripts and ``pytest`` paths exist (and name only
options the script defines), ``python -m`` modules exist and list the options used in their
``--help``, and ``pip install`` extras exist in ``pyproject.toml``. Shell commands go in
```` ```bash ```` blocks only, so none escapes these checks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from rlnorm.cli import main
from rollout_agents import QUIET_LIGHTNING

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- snippet: (?P<what>.+?) -->$")
AFTER_FIT = re.compile(r"^after rlnorm fit --config (?P<config>configs/[\w.-]+\.yaml)$")
# Enough for a checkpoint and a few logs: 3 rollouts of 2 environments x 32 steps.
TINY_FIT = [
    "--model.total_timesteps=192",
    "--model.num_envs=2",
    "--model.num_steps=32",
    "--model.update_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    lang: str
    code: str
    line: int  # README line of the first line of code (1-based)
    marker: str | None  # the `<!-- snippet: ... -->` text right above the fence, if any

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        start = i + 1
        end = start
        while not lines[end].startswith("```"):
            end += 1
        above = MARKER.match(lines[i - 1]) if i else None
        blocks.append(
            Block(
                lang=fence.group(1),
                code="\n".join(lines[start:end]) + "\n",
                line=start + 1,
                marker=above.group("what") if above else None,
            )
        )
        i = end + 1
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]


@pytest.fixture(scope="module")
def fit_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Working directories, one per config, where a shortened `rlnorm fit` has run."""
    return {"root": tmp_path_factory.mktemp("readme_fits")}


def run_fit_in(workdir: Path, config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.chdir(workdir)
        assert main(["fit", "--config", str(ROOT / config), *TINY_FIT]) == 0


def test_readme_has_python_and_bash_snippets_to_check() -> None:
    assert len(PYTHON) >= 5
    assert len(BASH) >= 3


def test_every_snippet_marker_is_one_the_test_knows() -> None:
    for block in BLOCKS:
        if block.marker is not None:
            assert block.lang == "python", f"{block.id}: markers apply to python blocks"
            assert block.marker == "fragment" or AFTER_FIT.match(block.marker), (
                f"{block.id}: unknown marker <!-- snippet: {block.marker} -->"
            )


def test_fragments_are_visibly_partial_to_a_reader() -> None:
    fragments = [b for b in PYTHON if b.marker == "fragment"]
    assert fragments, "the configure_callbacks method is shown out of its class"
    for block in fragments:
        first = block.code.lstrip().splitlines()[0]
        assert first.startswith("# ..."), f"{block.id}: start a fragment with a '# ...' comment"


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
@pytest.mark.filterwarnings("ignore::rlnorm.io.unpickler.PickleFileWarning")
@pytest.mark.filterwarnings("ignore:.*NormalizeObservation.*:UserWarning")
@pytest.mark.filterwarnings("ignore:.*You are calling 'step\\(\\)'.*")
@pytest.mark.filterwarnings("ignore:.*GPU available but not used.*")
@pytest.mark.filterwarnings("ignore:.*`training_step` returned.*")
@pytest.mark.filterwarnings(QUIET_LIGHTNING[0])
@pytest.mark.filterwarnings(QUIET_LIGHTNING[2])
@pytest.mark.filterwarnings("ignore:.*LightningCLI.s args parameter.*")
def test_every_full_python_snippet_runs_as_pasted(
    block: Block,
    tmp_path: Path,
    fit_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if block.marker == "fragment":
        pytest.skip(f"{block.id} is marked <!-- snippet: fragment -->")
    workdir = tmp_path
    after = AFTER_FIT.match(block.marker or "")
    if after is not None:
        config = after.group("config")
        workdir = fit_dirs["root"] / Path(config).stem
        if not workdir.exists():
            workdir.mkdir()
            run_fit_in(workdir, config, monkeypatch)
    monkeypatch.chdir(workdir)
    # Padding keeps README line numbers in tracebacks.
    source = "\n" * (block.line - 1) + block.code
    exec(compile(source, str(README), "exec"), {"__name__": "__readme__"})


# ---------------------------------------------------------------------------- bash blocks


def commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments dropped."""
    text = block.code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word == "&&":
                if command:
                    out.append(command)
                command = []
            else:
                command.append(word)
    return out


BASH_COMMANDS = [(b, c) for b in BASH for c in commands(b)]
BASH_IDS = [f"{b.id}:{' '.join(c)[:40]}" for b, c in BASH_COMMANDS]


@cache
def rlnorm_help(subcommand: str) -> str:
    """What ``rlnorm SUBCOMMAND --help`` prints (run in this process: the same ``main``)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        assert main([subcommand, "--help"]) == 0
    return out.getvalue()


def test_the_rlnorm_command_the_readme_uses_is_installed() -> None:
    assert shutil.which("rlnorm") is not None, "`pip install -e .` installs the rlnorm script"


@cache
def jupyter_execute_help() -> str:
    exe = shutil.which("jupyter")
    assert exe is not None, "`pip install -e .[notebook]` installs jupyter (with nbclient)"
    done = subprocess.run(
        [exe, "execute", "--help"], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout


@cache
def module_help(module: str) -> str:
    """What ``python -m MODULE --help`` prints, run as a reader would run it."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout


def options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def extras() -> set[str]:
    """The extras of ``[project.optional-dependencies]`` (read as text: no tomllib on 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = \[", section, flags=re.MULTILINE))


@pytest.mark.parametrize(("block", "command"), BASH_COMMANDS, ids=BASH_IDS)
def test_bash_commands_name_real_subcommands_options_files_and_extras(
    block: Block, command: list[str]
) -> None:
    where = f"{block.id}: {shlex.join(command)}"
    program, args = command[0], command[1:]
    if program == "pip":
        assert args[0] == "install", where
        for arg in args[1:]:
            extra = re.fullmatch(r"-e|\.|\.\[(?P<names>[\w,-]+)\]|torch==[\d.]+", arg)
            assert extra is not None, f"{where}: unexpected pip argument {arg!r}"
            if extra.group("names"):
                missing = set(extra.group("names").split(",")) - extras()
                assert not missing, f"{where}: no extra {missing} in pyproject.toml"
    elif program == "rlnorm":
        assert args, where
        assert args[0] in ("fit", "inspect", "export"), where
        text = rlnorm_help(args[0])
        for option in options(args[1:]):
            assert option in text, f"{where}: `rlnorm {args[0]} --help` has no {option}"
        for arg in args[1:]:
            if arg.startswith("configs/"):
                assert (ROOT / arg).is_file(), f"{where}: no file {arg}"
    elif program == "python":
        if args[:2] == ["-m", "pytest"]:
            for arg in args[2:]:
                if not arg.startswith("-"):
                    assert (ROOT / arg.split("::")[0]).exists(), f"{where}: no {arg}"
        elif args[0] == "-m":
            assert importlib.util.find_spec(args[1]) is not None, f"{where}: no module {args[1]}"
            text = module_help(args[1])
            for option in options(args[2:]):
                assert option in text, f"{where}: `python -m {args[1]} --help` has no {option}"
        else:
            script = ROOT / args[0]
            assert script.is_file(), f"{where}: no script {args[0]}"
            source = script.read_text()
            for option in options(args[1:]):
                assert f'"{option}"' in source, f"{where}: {args[0]} defines no {option}"
    elif program == "jupyter":
        assert args[0] == "execute", where
        text = jupyter_execute_help()
        for option in options(args[1:]):
            assert option in text, f"{where}: `jupyter execute --help` has no {option}"
        for arg in args[1:]:
            if not arg.startswith("-"):
                assert (ROOT / arg).is_file(), f"{where}: no notebook {arg}"
    else:
        pytest.fail(f"{where}: a command this test does not know how to check")


# ---------------------------------------------------------------------------- paths


def named_paths() -> set[str]:
    text = README.read_text(encoding="utf-8")
    pattern = r"(?<![\w/.])((?:configs|benchmarks|tests|notebooks|src)/[\w./-]+)"
    return set(re.findall(pattern, text))


def test_every_repository_path_the_readme_names_exists() -> None:
    paths = named_paths()
    assert "configs/cartpole.yaml" in paths
    missing = sorted(p for p in paths if not (ROOT / p.rstrip(".")).exists())
    assert not missing, f"README names paths that do not exist: {missing}"


def test_run_paths_in_the_readme_are_under_a_directory_a_config_writes_to() -> None:
    roots = {"runs"}  # the `rlnorm fit` default
    for config in (ROOT / "configs").glob("*.yaml"):
        root = yaml.safe_load(config.read_text()).get("trainer", {}).get("default_root_dir")
        if root:
            roots.add(root)
    text = README.read_text(encoding="utf-8")
    used = set(re.findall(r"\b(runs(?:/[\w.-]+)?)/lightning_logs/version_", text))
    assert "runs/cartpole" in used
    assert used <= roots, f"no config writes to {sorted(used - roots)}"


def test_shell_commands_sit_in_bash_blocks_where_they_are_checked() -> None:
    shells = ("console", "sh", "shell", "shell-session", "zsh")
    unchecked = [b.id for b in BLOCKS if b.lang in shells]
    assert not unchecked, f"put shell commands in bash blocks, where they are checked: {unchecked}"
