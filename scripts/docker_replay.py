#!/usr/bin/env python3
"""Replay a Dockerfile's build and its entry point without Docker, to catch a broken build in CI.

The Dockerfile itself is read: the base image's torch version (``FROM pytorch/pytorch:2.7.1-...``),
``ARG``/``ENV``, ``WORKDIR``, ``COPY`` (``--chown``, several sources, ``./`` destinations), ``RUN``,
``USER``, ``ENTRYPOINT``/``CMD``. A fresh temporary folder stands for the image's file system
(container paths such as ``/opt/hsr-pl`` and ``/workspace`` live under it), a virtual environment
stands for the base image's Python with torch, and every ``RUN`` runs in the same working folder
with the same environment, ``python``/``pip`` being the venv's. Then the entry point runs from the
final ``WORKDIR`` as the final ``USER`` (through ``setpriv`` when this runs as root), and the
replay checks that the installed package, not a source folder, is what gets imported and that the
run wrote nothing outside ``/workspace`` and the user's home.

What it does not do: no Docker daemon, no base-image layers (only Python + torch of the base
image are stood in for; its OS, conda, CUDA and GPU are not), ``useradd``/``chown`` are emulated
inside the folder (the host's accounts are never touched). ``RUN`` commands run on this machine
as the current user: replay only Dockerfiles you trust.

    python scripts/docker_replay.py                       # the faithful replay: torch of the base image
    python scripts/docker_replay.py --torch-from .venv-test/bin/python --pip-cache   # CI: no torch download

Exit status: 0 passed, 1 a step or check failed, 2 a bad input (one line, before any work).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_SMOKE = [
    "validate",
    "--config",
    "configs/demo.yaml",
    "--trainer.accelerator=auto",
    "--data.eval_num_samples=10",
]
DEMO_EXPECT = ["runs/demo/summary.json", "runs/demo/realigned/realignment.json"]
SUPPORTED = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "ENTRYPOINT", "CMD"}
IGNORED = {"LABEL", "EXPOSE", "VOLUME", "STOPSIGNAL", "HEALTHCHECK", "MAINTAINER"}
PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


class BadInput(Exception):
    """A Dockerfile or option the replay cannot honour: reported as one line, exit status 2."""


class StepFailed(Exception):
    """A replayed step failed: the build (or the image's run) would fail the same way."""


# ----------------------------------------------------------------------------------------- parsing
@dataclass
class Instruction:
    line: int
    keyword: str
    text: str  # the arguments, continuations joined

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form's list, or None for the shell form."""
        if self.text.lstrip().startswith("["):
            try:
                value = json.loads(self.text)
            except json.JSONDecodeError:
                return None
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
        return None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order; backslash continuations joined, comment lines dropped (as Docker does)."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:  # empty lines inside a continuation are skipped too
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, rest = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), rest.strip()))
    if pending:
        raise BadInput(f"the Dockerfile ends inside a continuation (line {start}); remove the trailing backslash")
    return out


_VAR = re.compile(r"\\\$|\$\{(\w+)(?::([-+])([^}]*))?\}|\$(\w+)")


def expand(value: str, env: dict[str, str]) -> str:
    """Docker's variable substitution in ENV/WORKDIR/COPY/USER: $X, ${X}, ${X:-default}, ${X:+alt}."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "\\$":
            return "$"
        current = env.get(m.group(1) or m.group(4), "")
        if m.group(2) == "-":
            return current or m.group(3)
        if m.group(2) == "+":
            return m.group(3) if current else ""
        return current

    return _VAR.sub(repl, value)


def parse_env(text: str, env: dict[str, str]) -> dict[str, str]:
    """``ENV a=1 b="two words"`` or the legacy ``ENV key value``."""
    tokens = shlex.split(text, posix=True)
    if not tokens:
        raise BadInput("an empty ENV instruction; give KEY=VALUE")
    if "=" not in tokens[0]:
        key, _, value = text.strip().partition(" ")
        return {key: expand(value.strip(), env)}
    out = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise BadInput(f"ENV {text!r}: {token!r} has no '='; write KEY=VALUE")
        out[key] = expand(value, {**env, **out})
    return out


def torch_version_of(image: str) -> str | None:
    """``pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime`` -> ``2.7.1``; None for other images."""
    name, _, tag = image.partition(":")
    if name.split("/")[-2:] != ["pytorch", "pytorch"] and name != "pytorch/pytorch":
        return None
    m = re.match(r"(\d+\.\d+(?:\.\d+)?)", tag)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------- the context
def context_files(context: Path, all_files: bool) -> list[str]:
    """The build context's files (relative, '/'-separated): a fresh clone's files unless all_files."""
    if (context / ".dockerignore").exists():
        raise BadInput(f"{context / '.dockerignore'}: .dockerignore is not replayed; remove it or extend this script")
    if not all_files:
        git = subprocess.run(
            ["git", "-C", str(context), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
        )
        if git.returncode == 0:
            names = [n for n in git.stdout.decode().split("\0") if n]
            return sorted(n for n in names if (context / n).is_file())
    return sorted(str(p.relative_to(context).as_posix()) for p in context.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------- the image
@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: str


@dataclass
class Image:
    """The replayed image: a folder standing for ``/``, its users and the build's state."""

    root: Path
    prefixes: list[str]
    users: dict[str, User] = field(default_factory=dict)

    def host(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def map_text(self, text: str) -> str:
        """Container paths under the known prefixes (WORKDIRs, COPY targets, /tmp, homes) -> host paths."""
        if not self.prefixes:
            return text
        alternatives = "|".join(re.escape(p) for p in sorted(self.prefixes, key=len, reverse=True))
        pattern = re.compile(r"(?<![\w.$/-])(" + alternatives + r")(?=$|[/\s\"'`;&|)<>:])")
        return pattern.sub(lambda m: str(self.host(m.group(1))), text)  # one pass: no path is mapped twice

    def save_users(self, path: Path) -> None:
        path.write_text(json.dumps({n: vars(u) for n, u in self.users.items()}))

    def load_users(self, path: Path) -> None:
        self.users = {n: User(**u) for n, u in json.loads(path.read_text()).items()}

    def resolve(self, spec: str) -> tuple[int, int]:
        """``name``, ``uid``, ``name:group`` or ``uid:gid`` -> numeric ids (Docker's rules)."""
        user, _, group = spec.partition(":")
        by_uid = {str(u.uid): u for u in self.users.values()}
        entry = self.users.get(user) or by_uid.get(user)
        if entry is None and not user.isdigit():
            raise StepFailed(f"unknown user {user!r} (no useradd created it)")
        uid = entry.uid if entry else int(user)
        if not group:
            return uid, entry.gid if entry else 0
        groups = {u.name: u.gid for u in self.users.values()}
        if group.isdigit():
            return uid, int(group)
        if group not in groups:
            raise StepFailed(f"unknown group {group!r} (no useradd created it)")
        return uid, groups[group]


def shim_sources(python: str) -> dict[str, str]:
    """Stand-ins for ``useradd`` and ``chown`` inside RUN: they act on the image folder only."""
    real_chown = shutil.which("chown", path="/usr/bin:/bin")  # by path: the shim must not call itself
    if real_chown is None:
        raise BadInput("no chown in /usr/bin or /bin")
    head = f"#!{python}\nimport json, os, subprocess, sys\nfrom pathlib import Path\n"
    head += "ROOT = Path(os.environ['DOCKER_REPLAY_ROOT']); USERS = Path(os.environ['DOCKER_REPLAY_USERS'])\n"
    useradd = head + (
        "args = sys.argv[1:]; uid = gid = None; home = None; create = False; name = None\n"
        "while args:\n"
        "    a = args.pop(0)\n"
        "    if a in ('-u', '--uid'): uid = int(args.pop(0))\n"
        "    elif a.startswith('--uid='): uid = int(a.split('=', 1)[1])\n"
        "    elif a in ('-g', '--gid'): gid = int(args.pop(0))\n"
        "    elif a in ('-m', '--create-home'): create = True\n"
        "    elif a in ('-M', '--no-create-home', '-U', '--user-group', '-r', '--system'): pass\n"
        "    elif a in ('-d', '--home-dir'): home = args.pop(0)\n"
        "    elif a in ('-s', '--shell', '-c', '--comment'): args.pop(0)\n"
        "    elif a.startswith('-'): sys.exit(f'useradd (replay): option {a} is not emulated')\n"
        "    else: name = a\n"
        "if name is None: sys.exit('useradd (replay): no user name')\n"
        "users = json.loads(USERS.read_text())\n"
        "taken = {u['uid'] for u in users.values()}\n"
        "if name in users: sys.exit(f'useradd: user {name!r} already exists')\n"
        "uid = uid if uid is not None else max([999, *taken]) + 1\n"
        "if uid in taken: sys.exit(f'useradd: UID {uid} is not unique')\n"
        "gid = gid if gid is not None else uid\n"
        "home = home or f'/home/{name}'\n"
        "users[name] = {'name': name, 'uid': uid, 'gid': gid, 'home': home}\n"
        "USERS.write_text(json.dumps(users))\n"
        "if create:\n"
        "    h = ROOT / home.lstrip('/'); h.mkdir(parents=True, exist_ok=True); h.chmod(0o750)\n"
        "    os.chown(h, uid, gid)\n"
    )
    chown = head + (
        "args = sys.argv[1:]; flags = [a for a in args if a.startswith('-')]; rest = [a for a in args if not a.startswith('-')]\n"
        "if len(rest) < 2: sys.exit('chown (replay): give OWNER[:GROUP] and paths')\n"
        "users = json.loads(USERS.read_text()); groups = {u['name']: u['gid'] for u in users.values()}\n"
        "user, _, group = rest[0].partition(':')\n"
        "uid = str(users[user]['uid']) if user in users else user\n"
        "gid = str(groups[group]) if group in groups else group\n"
        "if not uid.isdigit() or (group and not gid.isdigit()): sys.exit(f'chown: invalid user: {rest[0]!r}')\n"
        "for p in rest[1:]:\n"
        "    full = Path(p).resolve()\n"
        "    if full != ROOT.resolve() and ROOT.resolve() not in full.parents:\n"
        "        sys.exit(f'chown (replay): {p} lies outside the image folder; refusing')\n"
        f"sys.exit(subprocess.call([{real_chown!r}, *flags, uid + (':' + gid if group else ''), *rest[1:]]))\n"
    )
    return {"useradd": useradd, "chown": chown}


# ------------------------------------------------------------------------------------------ the run
def say(message: str) -> None:
    print(f"[replay] {message}", flush=True)


def reachable(folder: Path) -> bool:
    """Whether an unprivileged user can enter this folder (it and every parent searchable)."""
    real = folder.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in (real, *real.parents))


def traversable_by_others(path: Path) -> bool:
    """Whether an unprivileged user could run this file (every parent searchable, the file readable)."""
    real = path.resolve()
    for parent in real.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(real.stat().st_mode & stat.S_IROTH)


def pick_python(requested: str | None) -> str:
    if requested:
        return requested
    own = Path(sys.executable)
    if os.geteuid() != 0 or traversable_by_others(own):
        return str(own)
    # As root, the venv must be usable by the image's unprivileged user (a /root pyenv is not).
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if Path(candidate).exists() and traversable_by_others(Path(candidate)):
            return candidate
    return str(own)


def link_torch(donor: str, site: Path, target: Path) -> str:
    """Expose the donor environment's torch and its requirements (not the rest) through a .pth file."""
    probe = r"""
import json, re, sys
from importlib import metadata
seen, todo, entries = set(), ["torch"], set()
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen:
        continue
    seen.add(name)
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue
    for req in dist.requires or []:
        if "extra ==" in req.replace('"', "'").replace("'", "") or "extra==" in req:
            continue
        marker = req.split(";", 1)[1] if ";" in req else ""
        if marker:
            try:
                from packaging.markers import Marker
                if not Marker(marker).evaluate():
                    continue
            except Exception:
                pass
        todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    base = dist.locate_file("")
    for f in dist.files or []:
        if not str(f).startswith(".."):
            entries.add((str(base), f.parts[0]))
print(json.dumps({"version": metadata.version("torch"), "entries": sorted(entries)}))
"""
    out = subprocess.run([donor, "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        raise BadInput(f"--torch-from {donor}: could not read its torch ({out.stderr.strip().splitlines()[-1:]})")
    info = json.loads(out.stdout)
    target.mkdir(parents=True)
    for base, entry in info["entries"]:
        link = target / entry
        if not link.exists():
            link.symlink_to(Path(base) / entry)
    (site / "docker_replay_base_torch.pth").write_text(str(target) + "\n")
    return info["version"]


def run_step(argv: list[str], cwd: Path, env: dict[str, str], as_user: tuple[int, int] | None) -> int:
    if as_user is not None:
        argv = ["setpriv", f"--reuid={as_user[0]}", f"--regid={as_user[1]}", "--clear-groups", "--", *argv]
    return subprocess.run(argv, cwd=cwd, env=env).returncode


def snapshot(root: Path, skip: list[Path]) -> dict[str, tuple[int, int]]:
    out = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in files:
            p = here / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            out[str(p)] = (st.st_mtime_ns, st.st_size)
    return out


@dataclass
class Options:
    dockerfile: Path
    context: Path
    torch: str | None
    torch_from: str | None
    python: str | None
    pip_cache: bool
    all_files: bool
    entry_args: list[str] | None
    expect: list[str]
    extra_env: dict[str, str]
    import_check: str
    root: Path | None
    keep: bool


def replay(opts: Options) -> None:
    started = time.monotonic()
    timings: list[tuple[str, float]] = []
    instructions = parse_dockerfile(opts.dockerfile.read_text())
    for ins in instructions:
        if ins.keyword not in SUPPORTED | IGNORED:
            raise BadInput(f"{opts.dockerfile}:{ins.line}: {ins.keyword} is not replayed; extend scripts/docker_replay.py")
    froms = [i for i in instructions if i.keyword == "FROM"]
    if len(froms) != 1 or instructions[0].keyword not in ("FROM", "ARG"):
        raise BadInput(f"{opts.dockerfile}: the replay handles one FROM (no multi-stage build)")
    # ARGs before FROM feed FROM's substitution.
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        name, _, default = ins.text.partition("=")
        args[name.strip()] = default.strip()
    image_ref = expand(froms[0].text.split()[0], args)
    base_torch = torch_version_of(image_ref)
    if opts.torch_from is None and opts.torch is None and base_torch is None:
        raise BadInput(f"FROM {image_ref}: not a pytorch/pytorch image; give --torch SPEC or --torch-from PYTHON")

    files = context_files(opts.context, opts.all_files)
    # Container folders the RUN commands may name: mapped under the image folder.
    prefixes = {"/tmp", "/root", "/home"}
    workdir = "/"
    for ins in instructions:
        if ins.keyword == "WORKDIR":
            workdir = os.path.normpath(os.path.join(workdir, ins.text.strip()))
            prefixes.add(workdir)
        if ins.keyword == "COPY":
            dest = (ins.exec_form() or shlex.split(ins.text))[-1]
            prefixes.add(os.path.normpath(os.path.join(workdir, dest)))
    prefixes.discard("/")

    parent = Path(tempfile.gettempdir()) if opts.root is None else opts.root.parent
    if os.geteuid() == 0 and not reachable(parent):
        raise BadInput(f"{parent}: the image's unprivileged user could not enter it; give --root under a folder "
                       "every user can enter (e.g. /tmp)")
    if opts.root is not None:
        if opts.root.exists() and any(opts.root.iterdir()):
            raise BadInput(f"--root {opts.root}: not empty; give a new or empty folder")
        if opts.root.with_name(opts.root.name + ".state").exists():
            raise BadInput(f"--root {opts.root}: {opts.root.name}.state beside it exists; remove it or pick another --root")
    root = Path(tempfile.mkdtemp(prefix="docker-replay-")) if opts.root is None else opts.root
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    image = Image(root=root, prefixes=sorted(prefixes))
    image.users = {"root": User("root", 0, 0, "/root")}
    state = root.with_name(root.name + ".state")  # venv-side helpers: shims, the user table, torch links
    state.mkdir()
    users_file = state / "users.json"
    image.save_users(users_file)
    for folder, mode in (("/tmp", 0o1777), ("/root", 0o700)):
        image.host(folder).mkdir(parents=True, exist_ok=True)
        image.host(folder).chmod(mode)
    say(f"Dockerfile: {opts.dockerfile}; context: {opts.context}; image folder: {root}")
    say(f"container paths mapped under the image folder: {', '.join(image.prefixes)}")

    try:
        _replay_in(opts, instructions, image, image_ref, base_torch, state, users_file, timings, files)
    finally:
        elapsed = time.monotonic() - started
        say("timings: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in timings) + f"; total {elapsed:.0f} s")
        if opts.keep:
            say(f"kept the image folder {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(state, ignore_errors=True)


def _replay_in(opts, instructions, image, image_ref, base_torch, state, users_file, timings, files) -> None:
    t0 = time.monotonic()
    # --- the base image: Python + torch in a venv standing for the image's /opt/conda
    python = pick_python(opts.python)
    venv = image.host("/opt/venv")
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = Path(
        subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True).stdout.strip()
    )
    host_env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in PASSED_ENV or k.upper() in PASSED_ENV}
    if opts.torch_from:
        used = link_torch(opts.torch_from, site, state / "base-torch")
        how = f"linked from {opts.torch_from} (not downloaded)"
    else:
        spec = opts.torch or f"torch=={base_torch}"
        pip = subprocess.run([str(vpy), "-m", "pip", "install", "-q", spec], env={**os.environ, **host_env})
        if pip.returncode != 0:
            raise StepFailed(f"installing the base image's torch ({spec}) failed")
        used = subprocess.run([str(vpy), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                              text=True, check=True).stdout.strip()
        how = f"pip install {spec}"
    pyver = subprocess.run([str(vpy), "--version"], capture_output=True, text=True).stdout.strip()
    pipver = subprocess.run([str(vpy), "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]
    same = base_torch is not None and used.split("+")[0] == base_torch
    say(f"base image {image_ref}: torch {base_torch or '?'}; this replay: torch {used} ({how})"
        + ("" if same else f" -- SUBSTITUTED for the image's {base_torch or 'torch'}"))
    say(f"python: {pyver} from {python} (pip {pipver}); the image's own Python, OS, conda and CUDA are not replayed")
    timings.append(("base venv", time.monotonic() - t0))

    shims = state / "bin"
    shims.mkdir()
    for name, source in shim_sources(python).items():
        (shims / name).write_text(source)
        (shims / name).chmod(0o755)

    env: dict[str, str] = {}  # ARGs declared after FROM: visible to later RUNs, not to the image's run
    image_env: dict[str, str] = {}
    after_from = False
    workdir = "/"
    user = "root"
    entrypoint: list[str] | str | None = None
    cmd: list[str] | str | None = None
    say(f"build context: {len(files)} files ({'every file' if opts.all_files else 'the files git tracks or would add: a fresh clone'})")

    for ins in instructions:
        kw = ins.keyword
        where = f"Dockerfile line {ins.line}: {kw} {ins.text}"
        if kw == "FROM":
            after_from = True
            continue
        if kw in IGNORED or not after_from:
            continue
        if kw == "ARG":
            name, _, default = ins.text.partition("=")
            env.setdefault(name.strip(), expand(default.strip(), {**env, **image_env}))
        elif kw == "ENV":
            new = parse_env(ins.text, {**env, **image_env})
            image_env.update(new)
        elif kw == "WORKDIR":
            workdir = os.path.normpath(os.path.join(workdir, expand(ins.text.strip(), {**env, **image_env})))
            image.host(workdir).mkdir(parents=True, exist_ok=True)
        elif kw == "USER":
            user = expand(ins.text.strip(), {**env, **image_env})
            image.resolve(user)  # fails now, as Docker would at the next step, if unknown
        elif kw in ("ENTRYPOINT", "CMD"):
            value = ins.exec_form() or ins.text
            if kw == "ENTRYPOINT":
                entrypoint, cmd = value, None  # Docker resets CMD when ENTRYPOINT is set
            else:
                cmd = value
        elif kw == "COPY":
            _copy(ins, image, workdir, files, opts.context, {**env, **image_env})
            say(f"{where}")
        elif kw == "RUN":
            t = time.monotonic()
            image.load_users(users_file)
            text = ins.exec_form() or ins.text
            argv = [image.map_text(a) for a in text] if isinstance(text, list) else ["/bin/sh", "-c", image.map_text(text)]
            step_env = _environment(image, {**env, **image_env}, user, venv, shims, host_env, opts, state, users_file)
            say(f"{where}")
            if argv[-1] != (text if isinstance(text, str) else text[-1]):
                say(f"  as run here: {argv[-1]}")
            uid_gid = image.resolve(user)
            code = run_step(argv, image.host(workdir), step_env, uid_gid if uid_gid[0] != os.geteuid() else None)
            image.load_users(users_file)
            timings.append((f"RUN line {ins.line}", time.monotonic() - t))
            if code != 0:
                short = ins.text if len(ins.text) <= 160 else "..." + ins.text[-157:]
                raise StepFailed(f"the build stops at Dockerfile line {ins.line} (exit status {code}): RUN {short}")

    # --- the image's run: entry point from the final WORKDIR as the final USER
    image.load_users(users_file)
    uid, gid = image.resolve(user)
    as_user = (uid, gid) if uid != os.geteuid() else None
    mode = f"as uid {uid}:{gid} via setpriv"
    if as_user is not None and (os.geteuid() != 0 or shutil.which("setpriv") is None or not traversable_by_others(vpy)):
        as_user = None
        mode = f"as {os.geteuid()} (cannot switch to uid {uid} here: emulated by the write check only)"
    run_env = _environment(image, image_env, user, venv, shims, host_env, opts, state, users_file)
    run_env.update(opts.extra_env)
    if as_user is None:
        run_env["PYTHONDONTWRITEBYTECODE"] = "1"
    cwd = image.host(workdir)
    say(f"image run: WORKDIR {workdir}, USER {user} ({mode}), HOME {_home(image, user)}")
    if opts.extra_env:
        say(f"  extra environment for the run (not in the image): {opts.extra_env}")

    # 1. the installed package is what `python` imports in the WORKDIR (a source folder must not shadow it)
    if opts.import_check:
        check = ("import importlib, sys; m = importlib.import_module(sys.argv[1]); print(m.__file__)")
        out = subprocess.run(
            (["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"] if as_user else [])
            + [str(vpy), "-c", check, opts.import_check],
            cwd=cwd, env=run_env, capture_output=True, text=True,
        )
        if out.returncode != 0:
            sys.stdout.write(out.stdout + out.stderr)
            raise StepFailed(f"`python -c 'import {opts.import_check}'` fails in the WORKDIR {workdir}")
        origin = Path(out.stdout.strip().splitlines()[-1]).resolve()
        if venv.resolve() not in origin.parents:
            raise StepFailed(f"{opts.import_check} is imported from {origin}, not from the installed package")
        say(f"check: `import {opts.import_check}` in {workdir} loads the installed package ({origin.relative_to(image.root)})")

    def command_for(extra: list[str] | None) -> list[str]:
        ep = entrypoint if entrypoint is not None else []
        # a shell-form CMD reaches an exec-form ENTRYPOINT as `/bin/sh -c CMD`, as in Docker
        args_ = extra if extra is not None else (cmd if isinstance(cmd, list) else ["/bin/sh", "-c", cmd] if cmd else [])
        if isinstance(ep, str):
            return ["/bin/sh", "-c", ep]  # shell-form ENTRYPOINT ignores CMD and arguments, as in Docker
        return [*ep, *args_]

    runs = [("the image's default command (ENTRYPOINT + CMD)", command_for(None))]
    if opts.entry_args is not None:
        runs.append(("the entry point on the given arguments", command_for(opts.entry_args)))
    for label, argv in runs:
        if not argv:
            continue
        t = time.monotonic()
        before = snapshot(image.root, [cwd])
        say(f"{label}: {shlex.join(argv)}")
        resolved = shutil.which(argv[0], path=run_env["PATH"]) or argv[0]
        code = run_step([resolved, *argv[1:]], cwd, run_env, as_user)
        timings.append((argv[0] + (" " + argv[1] if len(argv) > 1 else ""), time.monotonic() - t))
        if code != 0:
            raise StepFailed(f"{label} exited with status {code}")
        after = snapshot(image.root, [cwd])
        home = _home(image, user)
        changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
        in_home = [p for p in changed if home != "/" and Path(p).is_relative_to(image.host(home))]
        outside = [p for p in changed if p not in in_home]
        if outside:
            shown = ", ".join(str(Path(p).relative_to(image.root)) for p in outside[:5])
            raise StepFailed(f"{label} wrote outside its WORKDIR {workdir} and home {home}: {shown}" + (" ..." if len(outside) > 5 else ""))
        note = f" ({len(in_home)} files in its home {home})" if in_home else ""
        say(f"check: nothing written outside the WORKDIR {workdir}{note}")
    for rel in opts.expect:
        if not (cwd / rel).exists():
            raise StepFailed(f"the run did not write {os.path.join(workdir, rel)}")
        say(f"check: {os.path.join(workdir, rel)} written")


def _home(image: Image, user: str) -> str:
    uid, _ = image.resolve(user)
    for u in image.users.values():
        if u.uid == uid:
            return u.home
    return "/"  # Docker's HOME for a uid without a passwd entry


def _environment(image, image_env, user, venv, shims, host_env, opts, state, users_file) -> dict[str, str]:
    env = {
        "PATH": f"{venv / 'bin'}:{shims}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(image.host(_home(image, user))),
        "TMPDIR": str(image.host("/tmp")),
        "LANG": "C.UTF-8",
        "VIRTUAL_ENV": str(venv),
        "DOCKER_REPLAY_ROOT": str(image.root),
        "DOCKER_REPLAY_USERS": str(users_file),
        **host_env,
    }
    env.update({k: image.map_text(v) for k, v in image_env.items()})
    if opts.pip_cache:
        env.pop("PIP_NO_CACHE_DIR", None)
        env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    return env


def _copy(ins: Instruction, image: Image, workdir: str, files: list[str], context: Path, env: dict[str, str]) -> None:
    tokens = ins.exec_form() or shlex.split(ins.text)
    flags = {}
    while tokens and tokens[0].startswith("--"):
        key, _, value = tokens.pop(0)[2:].partition("=")
        flags[key] = value
    unknown = set(flags) - {"chown", "chmod"}
    if unknown:
        raise BadInput(f"Dockerfile line {ins.line}: COPY --{sorted(unknown)[0]} is not replayed")
    if len(tokens) < 2:
        raise BadInput(f"Dockerfile line {ins.line}: COPY needs a source and a destination")
    *sources, dest = [expand(t, env) for t in tokens]
    dest_dir = dest.endswith("/") or dest in (".", "..") or len(sources) > 1
    target = os.path.normpath(os.path.join(workdir, dest))
    if len(sources) > 1 and not dest.endswith("/"):
        raise StepFailed(f"Dockerfile line {ins.line}: with several sources the destination must end with /")
    owner = image.resolve(flags["chown"]) if "chown" in flags else None
    copied: list[Path] = []
    for source in sources:
        src = os.path.normpath(source).lstrip("/")
        if src.startswith(".."):
            raise StepFailed(f"Dockerfile line {ins.line}: {source} lies outside the build context")
        if src == ".":
            matched = list(files)
            base = ""
        elif any(ch in src for ch in "*?["):
            matched = [f for f in files if fnmatch.fnmatchcase(f, src) or fnmatch.fnmatchcase(f.split("/")[0], src)]
            base = None
        else:
            matched = [f for f in files if f == src or f.startswith(src + "/")]
            base = src
        if not matched:
            raise StepFailed(f"Dockerfile line {ins.line}: COPY {source}: not found in the build context")
        for rel in matched:
            if base is None:  # a glob: matched files keep their name; matched folders copy their contents
                top = rel.split("/")[0]
                inner = rel[len(top) + 1:] if fnmatch.fnmatchcase(top, src) and rel != top else Path(rel).name
                out = image.host(target) / inner
            elif rel == base:  # a single file
                is_dir = dest_dir or image.host(target).is_dir()
                out = image.host(target) / Path(rel).name if is_dir else image.host(target)
            else:  # a folder: its contents go into the destination
                out = image.host(target) / rel[len(base):].lstrip("/")
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(context / rel, out)
            if "chmod" in flags:
                out.chmod(int(flags["chmod"], 8))
            copied.append(out)
    if owner is not None:
        dirs = {image.host(target)} | {p.parent for p in copied}
        for p in [*copied, *dirs]:
            os.chown(p, *owner)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dockerfile", type=Path, default=REPO / "Dockerfile")
    ap.add_argument("--context", type=Path, default=REPO, help="the build context (default: the repository)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--torch", help="torch requirement for the base image's stand-in (default: the FROM tag's version)")
    group.add_argument("--torch-from", metavar="PYTHON",
                       help="use the torch (and its requirements, nothing else) already installed for this interpreter")
    ap.add_argument("--python", help="interpreter for the venv (default: this one, or a system one others can run)")
    ap.add_argument("--pip-cache", action="store_true",
                    help="let pip in RUN use this machine's pip cache (the Dockerfile's PIP_NO_CACHE_DIR is dropped)")
    ap.add_argument("--all-files", action="store_true", help="copy ignored files too (default: a fresh clone's files)")
    ap.add_argument("--entry-args", default=shlex.join(DEMO_SMOKE),
                    help="arguments for the entry point after its default command; '' to run only the default "
                         f"(default: {shlex.join(DEMO_SMOKE)!r}, the demo with 10 prompts per evaluation set)")
    ap.add_argument("--full-demo", action="store_true", help="run the whole demo (validate --config configs/demo.yaml)")
    ap.add_argument("--expect", action="append", help="a path (relative to WORKDIR) the run must write")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the image's run")
    ap.add_argument("--import-check", default="hsr_pl.callbacks",
                    help="module that `python` must import from the installed package in the WORKDIR ('' to skip)")
    ap.add_argument("--root", type=Path, help="folder standing for the image's / (new or empty; default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the image folder afterwards")
    ns = ap.parse_args(argv)
    try:
        if not ns.dockerfile.is_file():
            raise BadInput(f"--dockerfile {ns.dockerfile}: no such file")
        if not ns.context.is_dir():
            raise BadInput(f"--context {ns.context}: no such folder")
        extra_env = {}
        for item in ns.env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise BadInput(f"--env {item!r}: write KEY=VALUE")
            extra_env[key] = value
        if ns.torch_from and shutil.which(ns.torch_from) is None and not Path(ns.torch_from).exists():
            raise BadInput(f"--torch-from {ns.torch_from}: no such interpreter")
        entry = ["validate", "--config", "configs/demo.yaml", "--trainer.accelerator=auto"] if ns.full_demo else (
            shlex.split(ns.entry_args) or None)
        default_expect = DEMO_EXPECT if entry and entry[:3] == DEMO_SMOKE[:3] else []
        opts = Options(
            dockerfile=ns.dockerfile.resolve(), context=ns.context.resolve(), torch=ns.torch, torch_from=ns.torch_from,
            python=ns.python, pip_cache=ns.pip_cache, all_files=ns.all_files, entry_args=entry,
            expect=ns.expect if ns.expect is not None else default_expect, extra_env=extra_env,
            import_check=ns.import_check, root=ns.root.resolve() if ns.root else None, keep=ns.keep,
        )
        replay(opts)
    except BadInput as err:
        print(f"docker_replay: error: {err}", file=sys.stderr)
        return 2
    except StepFailed as err:
        say(f"REPLAY FAILED: {err}")
        return 1
    say("REPLAY PASSED: the build's steps and the image's run succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
