"""The Dockerfile, checked without a Docker engine: what it copies exists and survives .dockerignore,
the base is a CUDA runtime image chosen by ARG, it runs as a non-root user under `accelerate launch`,
data/runs/caches are volumes, the extras it installs exist, and every file its comments name exists.
"""
from __future__ import annotations

import glob
import json
import posixpath
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
ROOT_USERS = {"root", "0"}
# repository folders whose files the Dockerfile's comments (and CMD) may name
REPO_DIRS = ("scripts", "bench", "configs", "accelerate_configs")
CACHE_ENVS = ("HF_HOME", "TORCH_HOME", "FGCLF_CACHE", "TORCH_EXTENSIONS_DIR")


# ----------------------------------------------------------------------------------------- parsing
@dataclass
class Instruction:
    cmd: str    # upper-case keyword
    args: str   # the rest, continuations joined
    line: int   # 1-based line where it starts


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[str]]:
    """Split a Dockerfile into instructions (backslash continuations joined, comment lines inside a
    continuation dropped, as Docker does) and its comment lines (without the leading '#')."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            comments.append(stripped[1:].strip())
            continue
        if not stripped and not buf:
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(part for part in buf if part)
        buf = []
        keyword, _, rest = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
    if buf:
        joined = " ".join(buf)
        keyword, _, rest = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
    return instructions, comments


def split_args(args: str) -> list[str]:
    """Exec (JSON array) or shell form arguments of COPY/VOLUME/ENTRYPOINT/CMD as a list."""
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def expand_args(text: str, values: dict[str, str]) -> str:
    """Substitute $NAME / ${NAME} with ARG defaults (unknown names are left as they are)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex anchored at the context root."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def parse_dockerignore(text: str) -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per pattern line, in order."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if negate else line).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether `path` (relative to the context root) is left out of the build context: the last rule
    matching the path or one of its parent folders decides."""
    path = posixpath.normpath(path).lstrip("/")
    parts = path.split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


def _files_under(root: Path, rel: str) -> list[str]:
    """Files under folder `rel` that belong in the image: the ones git tracks or would track (not
    gitignored), or, outside a git checkout, every file except Python bytecode."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard",
                              "--", rel], capture_output=True,
                             text=True, check=True).stdout.split()
        if out:
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    return [p.relative_to(root).as_posix() for p in (root / rel).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]


# ---------------------------------------------------------------------------------------- checking
def check_dockerfile(root: Path) -> list[str]:
    """Every problem found in root/Dockerfile (with root/.dockerignore, root/pyproject.toml)."""
    root = Path(root)
    problems: list[str] = []
    instructions, comments = parse_dockerfile((root / "Dockerfile").read_text())
    ignore_file = root / ".dockerignore"
    rules = parse_dockerignore(ignore_file.read_text()) if ignore_file.exists() else []
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    by_cmd = lambda cmd: [i for i in instructions if i.cmd == cmd]  # noqa: E731

    # --- base image: an ARG (declared before FROM) with a CUDA runtime default
    froms = by_cmd("FROM")
    if not froms:
        return ["no FROM instruction"]
    first_from = instructions.index(froms[0])
    global_args = {}
    for ins in instructions[:first_from]:
        if ins.cmd == "ARG":
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
    image = froms[-1].args.split()[0]
    m = re.fullmatch(r"\$\{?(\w+)\}?", image)
    if not m:
        problems.append(f"FROM {image}: the base image is not parameterised by an ARG")
    elif m.group(1) not in global_args:
        problems.append(f"FROM {image}: ARG {m.group(1)} is not declared before FROM")
    else:
        base = global_args[m.group(1)]
        if "cuda" not in base.lower() or "runtime" not in base.lower():
            problems.append(f"base image {base!r} is not a CUDA runtime image")
        # the base's torch (e.g. pytorch/pytorch:2.14.1-cuda...) must satisfy the project's pin
        tag = re.match(r"pytorch/pytorch:(\d+\.\d+\.\d+)", base)
        torch_req = next((Requirement(r) for r in pyproject["project"]["dependencies"]
                          if Requirement(r).name == "torch"), None)
        if tag and torch_req and not torch_req.specifier.contains(Version(tag.group(1))):
            problems.append(f"base image torch {tag.group(1)} does not satisfy the project's {torch_req}")

    # --- COPY/ADD sources exist in the repository and survive .dockerignore
    copied: list[str] = []
    for ins in by_cmd("COPY") + by_cmd("ADD"):
        flag_re = r"(?:^|\s)--([\w-]+)(?:=\S+)?"
        if "from" in re.findall(flag_re, ins.args.split("[")[0]):
            continue  # from another build stage or image
        tokens = split_args(re.sub(flag_re, "", ins.args).strip())
        if len(tokens) < 2:
            problems.append(f"line {ins.line}: {ins.cmd} needs a source and a destination")
            continue
        for src in tokens[:-1]:
            if re.match(r"https?://", src):
                continue
            rel = posixpath.normpath(src).lstrip("/")
            matches = [Path(p).relative_to(root).as_posix() for p in glob.glob(str(root / rel))]
            if not matches:
                problems.append(f"line {ins.line}: {ins.cmd} source {src!r} does not exist")
                continue
            for path in matches:
                copied.append(path)
                if is_ignored(path, rules):
                    problems.append(f"line {ins.line}: {ins.cmd} source {path!r} is excluded by .dockerignore")
                elif (root / path).is_dir():
                    lost = [f for f in _files_under(root, path) if is_ignored(f, rules)]
                    if lost:
                        problems.append(f"line {ins.line}: .dockerignore excludes files under {path!r}: {lost[:5]}")

    # --- non-root USER before ENTRYPOINT (ARG defaults substituted), and created by the image
    arg_values = dict(global_args)
    for ins in instructions[instructions.index(froms[-1]):]:
        if ins.cmd == "ARG" and "=" in ins.args:
            name, _, default = ins.args.partition("=")
            arg_values[name.strip()] = default.strip().strip('"')
    users = [Instruction(u.cmd, expand_args(u.args, arg_values), u.line) for u in by_cmd("USER")]
    entrypoints = by_cmd("ENTRYPOINT")
    if not users:
        problems.append("no USER instruction: the container would run as root")
    else:
        last_user = users[-1].args.split(":")[0].strip()
        if last_user in ROOT_USERS:
            problems.append(f"line {users[-1].line}: the last USER is root ({users[-1].args})")
        if entrypoints and not any(u.line < entrypoints[-1].line and u.args.split(":")[0] not in ROOT_USERS
                                   for u in users):
            problems.append("no non-root USER before ENTRYPOINT")
        if not last_user.isdigit() and not any(
                re.search(rf"\b(useradd|adduser)\b.*\b{re.escape(last_user)}\b", r.args) for r in by_cmd("RUN")):
            problems.append(f"USER {last_user} is never created (no useradd/adduser in a RUN)")

    # --- ENTRYPOINT ["accelerate", "launch"] in exec form
    if not entrypoints:
        problems.append("no ENTRYPOINT")
    elif not entrypoints[-1].args.startswith("["):
        problems.append(f"ENTRYPOINT is not in exec (JSON) form: {entrypoints[-1].args}")
    elif json.loads(entrypoints[-1].args) != ["accelerate", "launch"]:
        problems.append(f"ENTRYPOINT is {entrypoints[-1].args}, not [\"accelerate\", \"launch\"]")

    # --- volumes: /data, <WORKDIR>/runs, and every cache under one
    volumes = {posixpath.normpath(v) for ins in by_cmd("VOLUME") for v in split_args(ins.args)}
    workdirs = by_cmd("WORKDIR")
    workdir = workdirs[-1].args if workdirs else "/"
    for needed in ("/data", posixpath.join(workdir, "runs")):
        if needed not in volumes:
            problems.append(f"VOLUME does not declare {needed} (declared: {sorted(volumes)})")
    env = {}
    for ins in by_cmd("ENV"):
        for token in shlex.split(ins.args):
            if "=" in token:
                key, _, value = token.partition("=")
                env[key] = value
    for key in CACHE_ENVS:
        value = env.get(key)
        if value is None:
            problems.append(f"ENV {key} is not set")
        elif not any(value == v or value.startswith(v.rstrip("/") + "/") for v in volumes):
            problems.append(f"ENV {key}={value} is not under a VOLUME")

    # --- extras in `pip install .[a,b]` exist in pyproject
    extras_defined = set(pyproject["project"].get("optional-dependencies", {}))
    installs = [r for r in by_cmd("RUN") if re.search(r"\bpip\b.*\binstall\b", r.args)]
    named = [x.strip() for r in installs for group in re.findall(r"\.\[([^\]]*)\]", r.args)
             for x in group.split(",")]
    if not named:
        problems.append("no `pip install .[extras]` of the project")
    for extra in named:
        if extra not in extras_defined:
            problems.append(f"pip installs extra {extra!r}, not in pyproject's optional-dependencies "
                            f"{sorted(extras_defined)}")

    # --- files the comments (and CMD) name exist, and are copied into the image
    referenced = set()
    for text in comments + [" ".join(split_args(i.args)) for i in by_cmd("CMD")]:
        for path in re.findall(rf"(?<![\w/.-])((?:{'|'.join(REPO_DIRS)})/[\w./-]*\w)", text):
            referenced.add(path)
    for path in sorted(referenced):
        if not (root / path).exists():
            problems.append(f"the Dockerfile names {path}, which does not exist")
        elif not any(path == c or path.startswith(c.rstrip("/") + "/") for c in copied):
            problems.append(f"the Dockerfile names {path}, which is not copied into the image")
    return problems


def referenced_paths(root: Path) -> set[str]:
    _, comments = parse_dockerfile((Path(root) / "Dockerfile").read_text())
    return {p for c in comments for p in re.findall(r"accelerate_configs/[\w.-]+\.yaml", c)}


# ------------------------------------------------------------------------------------------- tests
def test_repository_dockerfile_has_no_problems():
    assert check_dockerfile(REPO) == []


def test_header_shows_one_and_eight_gpu_runs():
    named = referenced_paths(REPO)
    assert {"accelerate_configs/gpu1_bf16.yaml", "accelerate_configs/ddp_8gpu_bf16.yaml"} <= named
    _, comments = parse_dockerfile((REPO / "Dockerfile").read_text())
    header = "\n".join(comments)
    assert "docker build" in header and "--gpus all" in header
    assert "--ipc=host" in header or "--shm-size" in header  # DataLoader workers / NCCL shared memory


def test_parser_joins_continuations_and_skips_comments():
    ins, comments = parse_dockerfile("# head\nFROM x\nRUN a \\\n  # inner\n  && b\n\nUSER u\n")
    assert [(i.cmd, i.args, i.line) for i in ins] == [("FROM", "x", 2), ("RUN", "a && b", 3), ("USER", "u", 7)]
    assert comments == ["head", "inner"]


@pytest.mark.parametrize("path,ignored", [
    (".venv/bin/python", True), ("runs/x/metrics.json", True), ("fgclf/__pycache__/a.pyc", True),
    ("fgclf.egg-info", True), ("data/CUB", True), ("fgclf/data/toy.py", False),
    ("scripts/train_classifier.py", False), ("README.md", False), ("keep/runs", False),
])
def test_dockerignore_matching(path, ignored):
    rules = parse_dockerignore("runs\n.venv/\n*.egg-info\n**/__pycache__\ndata\n/build\n")
    assert is_ignored(path, rules) is ignored


def test_dockerignore_exception_wins_when_last():
    rules = parse_dockerignore("docs\n!docs/keep.md\n")
    assert not is_ignored("docs/keep.md", rules) and is_ignored("docs/other.md", rules)


def _fake_repo(tmp_path: Path, dockerfile: str, dockerignore: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "fgclf").mkdir()
    (tmp_path / "fgclf" / "__init__.py").write_text("")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "train_classifier.py").write_text("")
    (tmp_path / "accelerate_configs").mkdir()
    (tmp_path / "accelerate_configs" / "gpu1_bf16.yaml").write_text("")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["torch<=2.14.1"]\n'
        '[project.optional-dependencies]\ndeepspeed = ["deepspeed"]\n')
    (tmp_path / "Dockerfile").write_text(dockerfile)
    (tmp_path / ".dockerignore").write_text(dockerignore)
    return tmp_path


GOOD = """\
# run: docker run --gpus all img --config_file accelerate_configs/gpu1_bf16.yaml scripts/train_classifier.py
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}
ENV HF_HOME=/cache/hf TORCH_HOME=/cache/torch FGCLF_CACHE=/cache/fgclf TORCH_EXTENSIONS_DIR=/cache/ext
RUN useradd --uid 1000 fgclf
WORKDIR /opt/fgclf
COPY pyproject.toml ./
COPY fgclf ./fgclf
RUN pip install '.[deepspeed]'
COPY scripts ./scripts
COPY accelerate_configs ./accelerate_configs
USER fgclf
VOLUME ["/data", "/opt/fgclf/runs", "/cache"]
ENTRYPOINT ["accelerate", "launch"]
CMD ["scripts/train_classifier.py", "--help"]
"""


def test_checker_accepts_a_good_dockerfile(tmp_path):
    assert check_dockerfile(_fake_repo(tmp_path, GOOD)) == []


@pytest.mark.parametrize("old,new,expected", [
    ("COPY fgclf ./fgclf", "COPY fgclf missing.txt ./", "'missing.txt' does not exist"),
    ("USER fgclf", "USER root", "the last USER is root"),
    ("USER fgclf", "ARG UID=0\nUSER ${UID}", "the last USER is root (0)"),
    ("USER fgclf", "USER 0:0", "the last USER is root"),
    ("USER fgclf\n", "", "no USER instruction"),
    ("RUN useradd --uid 1000 fgclf", "RUN true", "USER fgclf is never created"),
    ("FROM ${BASE_IMAGE}", "FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime", "not parameterised by an ARG"),
    ("cudnn9-runtime", "cudnn9-devel", "not a CUDA runtime image"),
    ("pytorch:2.14.1", "pytorch:2.99.0", "does not satisfy the project's torch<=2.14.1"),
    ('ENTRYPOINT ["accelerate", "launch"]', "ENTRYPOINT accelerate launch", "not in exec (JSON) form"),
    ('ENTRYPOINT ["accelerate", "launch"]', 'ENTRYPOINT ["python"]', "not [\"accelerate\", \"launch\"]"),
    ('"/data", ', "", "VOLUME does not declare /data"),
    ('"/opt/fgclf/runs", ', "", "VOLUME does not declare /opt/fgclf/runs"),
    ('"/cache"', '"/other"', "ENV HF_HOME=/cache/hf is not under a VOLUME"),
    (".[deepspeed]", ".[deepspeed,gpu]", "pip installs extra 'gpu'"),
    ("gpu1_bf16.yaml", "gpu8_bf16.yaml", "names accelerate_configs/gpu8_bf16.yaml, which does not exist"),
    ("COPY scripts ./scripts\n", "", "names scripts/train_classifier.py, which is not copied"),
])
def test_checker_reports_each_problem(tmp_path, old, new, expected):
    assert old in GOOD
    problems = check_dockerfile(_fake_repo(tmp_path, GOOD.replace(old, new)))
    assert any(expected in p for p in problems), problems


def test_checker_reads_copy_flags_and_exec_form(tmp_path):
    dockerfile = GOOD.replace("COPY fgclf ./fgclf", 'COPY --chown=fgclf:fgclf --link ["fgclf", "./fgclf"]\n'
                                                    "COPY --from=builder /nowhere /opt/x")
    assert check_dockerfile(_fake_repo(tmp_path, dockerfile)) == []
    dockerfile = GOOD.replace("COPY fgclf ./fgclf", 'COPY --chown=fgclf ["fgclf", "nope", "./"]')
    assert any("'nope' does not exist" in p for p in check_dockerfile(_fake_repo(tmp_path / "b", dockerfile)))


@pytest.mark.parametrize("ignore,expected", [
    ("scripts\n", "source 'scripts' is excluded by .dockerignore"),
    ("**/*.py\n", "excludes files under 'fgclf'"),
])
def test_checker_reports_copied_paths_excluded_by_dockerignore(tmp_path, ignore, expected):
    problems = check_dockerfile(_fake_repo(tmp_path, GOOD, ignore))
    assert any(expected in p for p in problems), problems
