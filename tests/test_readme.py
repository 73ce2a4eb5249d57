"""The README read by a newcomer: its Python snippets run as written, the public names it uses work after
``import pvae``, and its Layout lists every module there is.

The snippets are taken from README.md each time, so that they cannot drift from what the tests run. A
snippet that needs what the tests do not have (files, the network) carries a ``# needs: WHAT`` line and
is skipped with that reason.
"""

import re
import socket
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NEEDS = re.compile(r"^\s*# needs: (.+)$", re.MULTILINE)


def fenced_blocks(text: str, language: str) -> list:
    """``(first line number, code)`` of every ```language block of ``text``, the number 1-based."""
    blocks, lines, start = [], text.splitlines(), None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == f"```{language}":
            start = number + 1
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start - 1:number - 1]) + "\n"))
            start = None
    if start is not None:
        raise ValueError(f"README.md: the ```{language} block from line {start - 1} is never closed")
    return blocks


def test_fenced_blocks_keep_their_line_numbers():
    text = "intro\n```python\nx = 1\n```\n```\nshell\n```\n```python\n# needs: data\ny = 2\n```\n"
    assert fenced_blocks(text, "python") == [(3, "x = 1\n"), (9, "# needs: data\ny = 2\n")]
    assert NEEDS.findall(fenced_blocks(text, "python")[1][1]) == ["data"]


SNIPPETS = fenced_blocks(README.read_text(), "python")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("line, code", SNIPPETS, ids=[f"line-{line}" for line, _ in SNIPPETS])
def test_readme_python_snippet_runs(line, code, tmp_path, monkeypatch):
    """Each snippet, verbatim, in a folder of its own (what it writes stays there); a failure's
    traceback points at the README's line. A process group, if the snippet starts one, has one rank."""
    needs = NEEDS.findall(code)
    if needs:
        pytest.skip(f"README.md line {line}: needs {', '.join(needs)}")
    monkeypatch.chdir(tmp_path)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                        "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    pyro.clear_param_store()
    try:
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "__main__"})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_snippets_exist():
    assert len(SNIPPETS) >= 3, "the README's ```python blocks went missing: the test above would pass on none"


def test_every_public_name_in_the_readme_works_after_import_pvae():
    """``pvae.x.y`` as the README writes it, in a fresh interpreter that has imported nothing but pvae
    (in this one, other tests have imported the submodules already)."""
    names = sorted({m.rstrip(".") for m in re.findall(r"\bpvae\.[A-Za-z_][\w.]*", README.read_text())})
    assert len(names) > 20
    probe = (
        "import sys, pvae\n"
        "missing = []\n"
        "for name in sys.argv[1:]:\n"
        "    obj = pvae\n"
        "    try:\n"
        "        for part in name.split('.')[1:]:\n"
        "            obj = getattr(obj, part)\n"
        "    except AttributeError as error:\n"
        "        missing.append(f'{name}: {error}')\n"
        "print('\\n'.join(missing))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"names the README uses that fail after `import pvae`:\n{done.stdout}"


def test_every_module_is_reachable_after_import_pvae():
    """Every module of pvae/, models/ and guides/ as an attribute chain from ``import pvae`` alone."""
    modules = [f"pvae.{p.stem}" for p in (ROOT / "pvae").glob("*.py") if not p.stem.startswith("_")]
    modules += [f"pvae.{folder}.{p.stem}" for folder in ("models", "guides") for p in (ROOT / folder).glob("*.py")
                if not p.stem.startswith("_")]
    probe = ("import sys, functools, pvae\n"
             "for name in sys.argv[1:]:\n"
             "    functools.reduce(getattr, name.split('.')[1:], pvae)\n")
    done = subprocess.run([sys.executable, "-c", probe, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- the Layout section


def layout_block() -> str:
    text = README.read_text()
    section = text[text.index("## Layout"):]
    return fenced_blocks(section, "")[0][1]


def layout_entries() -> dict:
    """``{folder: the text beside it}`` of the Layout block (an entry's lines indented under it)."""
    entries, folder = {}, None
    for line in layout_block().splitlines():
        head = re.match(r"^([\w-]+/)\s", line)
        if head:
            folder = head.group(1)
        entries[folder] = entries.get(folder, "") + " " + line
    return entries


def layout_names(folder: str, suffix: str = ".py") -> set:
    return {p.name[:-len(suffix)] for p in (ROOT / folder).glob(f"*{suffix}") if not p.name.startswith("_")}


@pytest.mark.parametrize("folder", ["pvae", "models", "guides", "examples", "benchmarks"])
def test_layout_names_every_module(folder):
    entry = layout_entries().get(f"{folder}/")
    assert entry is not None, f"README's Layout has no line for {folder}/"
    missing = sorted(name for name in layout_names(folder) if not re.search(rf"\b{re.escape(name)}\b", entry))
    assert not missing, f"README's Layout does not name {folder}/'s module(s) {', '.join(missing)}"
