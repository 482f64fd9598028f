"""Tab completion: `eval "$(python -m gpt2exp.train -sc install=bash)"` completes `python -m gpt2exp.train ...`.

As Hydra's own tests do, a shell is started with the install script evaluated, COMP_LINE set as
the shell sets it on TAB, and the completion function registered for the command called.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2exp.completion import FUNCTION, module_install_script
from tests.conftest import REPO

# What bash does on TAB: set COMP_LINE, COMP_POINT, COMP_WORDS, COMP_CWORD, then call the function that
# `complete` registered for the command with (command, current word, previous word).
BASH_TAB = r"""
tab() {
    COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}
    COMP_WORDS=($COMP_LINE); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
    [ "${COMP_LINE: -1}" = " " ] && COMP_CWORD=${#COMP_WORDS[@]}
    local function=$(complete -p "${COMP_WORDS[0]}" | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
    COMPREPLY=()
    "$function" "${COMP_WORDS[0]}" "${COMP_WORDS[$COMP_CWORD]}" "${COMP_WORDS[$COMP_CWORD-1]}"
    echo "${COMPREPLY[*]}"
}
"""

LINES = {
    "python -m gpt2exp.train logger=": "logger=none logger=tensorboard logger=wandb logger=wandb_tensorboard",
    "python -m gpt2exp.train optimizer.l": "optimizer.lr=",
    "python -m gpt2exp.train trainer.max_steps=10 model=gpt2_t": "model=gpt2_tiny",
    "python3 -m gpt2exp.train +experiment=shakespeare_": "+experiment=shakespeare_small +experiment=shakespeare_tiny",
}


def shell(program: str, script: str) -> list[str]:
    """Run `script` in `program` (bash, zsh) with this interpreter's bin dir first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([program, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_only_an_install_for_the_module_start_replaces_hydras_script():
    module = ["python", "-m", "gpt2exp.train"]
    assert FUNCTION in module_install_script(["train.py", "-sc", "install=bash"], [*module, "-sc", "install=bash"])
    assert "complete -r python python3" in module_install_script(
        ["train.py", "--shell-completion", "uninstall=zsh"], [*module, "--shell-completion", "uninstall=zsh"]
    )
    assert module_install_script(["train.py", "-sc", "query=bash"], [*module, "-sc", "query=bash"]) is None
    assert module_install_script(["train.py", "-sc", "install=fish"], [*module, "-sc", "install=fish"]) is None
    assert module_install_script(["gpt2exp-train", "-sc", "install=bash"], ["gpt2exp-train", "-sc"]) is None
    assert module_install_script(["train.py", "install=bash"], [*module, "install=bash"]) is None


@pytest.mark.slow
def test_bash_completes_python_dash_m_gpt2exp_train():
    script = BASH_TAB + 'eval "$(python -m gpt2exp.train -sc install=bash)"\n'
    script += "complete -p python python3\n" + "".join(f"tab {line!r}\n" for line in LINES)
    out = shell("bash", script)
    assert out[:2] == [f"complete -o default -o nospace -F {FUNCTION} {name}" for name in ("python", "python3")]
    assert dict(zip(LINES, out[2:], strict=True)) == LINES


@pytest.mark.slow
def test_other_python_lines_keep_their_completion_and_uninstall_puts_it_back():
    script = BASH_TAB + "_mine() { COMPREPLY=(mine); }\ncomplete -F _mine python\n"
    script += 'eval "$(python -m gpt2exp.train -sc install=bash)"\n' * 2  # installed twice
    script += "tab 'python other.py '\ntab 'python -m gpt2exp.train logger=n'\n"
    script += 'eval "$(python -m gpt2exp.train -sc uninstall=bash)"\ncomplete -p python\n'
    script += f"type {FUNCTION} >/dev/null 2>&1 || echo gone\n"
    assert shell("bash", script) == ["mine", "logger=none", "complete -F _mine python", "gone"]


@pytest.mark.slow
def test_the_console_script_completes_with_hydras_own_script():
    if shutil.which("gpt2exp-train", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the gpt2exp-train console script is not installed (pip install -e .)")
    script = BASH_TAB + 'eval "$(gpt2exp-train -sc install=bash)"\n' + "tab 'gpt2exp-train logger=wandb'\n"
    assert shell("bash", script) == ["logger=wandb logger=wandb_tensorboard"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_with_bashcompinit_completes_the_module_and_uninstall_puts_back_its_completion():
    # zsh calls the function through bashcompinit's compgen -F, with `words` and CURRENT as zsh sets them
    script = """
autoload -Uz compinit && compinit -u -D
autoload -Uz bashcompinit && bashcompinit
_mine() { :; }
compdef _mine python
eval "$(python -m gpt2exp.train -sc install=zsh)"
tab() {
    COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}
    words=( ${=1} ); [[ "$1" == *" " ]] && words+=( "" )
    CURRENT=${#words}; COMP_CWORD=$(( CURRENT - 1 ))
    compgen -o nospace -o default -F _gpt2exp_train_completion -- "${words[CURRENT]}" | tr '\\n' ' '; echo
}
tab 'python -m gpt2exp.train logger='
eval "$(python -m gpt2exp.train -sc uninstall=zsh)"
echo "$_comps[python]"
"""
    out = shell("zsh", script)
    assert out == [LINES["python -m gpt2exp.train logger="] + " ", "_mine"]
