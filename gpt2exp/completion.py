"""Tab completion for `python -m gpt2exp.train` in bash and zsh, answered by Hydra's own completion.

    eval "$(python -m gpt2exp.train -sc install=bash)"      # then: python -m gpt2exp.train optimizer.<TAB>
    eval "$(python -m gpt2exp.train -sc uninstall=bash)"    # puts back the python completion there was before
    eval "$(gpt2exp-train -sc install=bash)"                 # the console script: Hydra's script as it is

(zsh: `autoload -Uz bashcompinit && bashcompinit` first, then the same with install=zsh.)

Hydra's install script registers the program it was started as: an installed script by its name, or
`python` for a `.py` file, whose completion function then expects `python FILE.py ...`. Started as
`python -m gpt2exp.train` it registers `python` but never completes a `-m` line. For that start this
module prints its own script instead: it registers `python` and `python3`, completes a line
`python -m gpt2exp.train ...` with the choices Hydra gives (`python -m gpt2exp.train -sc query=bash`,
the line handed over as Hydra reads an installed app's: `gpt2exp.train ...`), and passes any other
python line to the completion that was registered before (or to file names).
"""

from __future__ import annotations

import re

MODULE = "gpt2exp.train"
COMMANDS = ("python", "python3")
FUNCTION = "_gpt2exp_train_completion"
SHELLS = ("bash", "zsh")  # Hydra's zsh completion is its bash script under bashcompinit

INSTALL = r"""
_gpt2exp_completion_of() { complete -p "$1" 2>/dev/null | sed -n 's/.* -F \([^ ]*\) .*/\1/p'; }
if [ -n "$ZSH_VERSION" ]; then  # bashcompinit: zsh's own python completion is put back on uninstall
    [ -z "$_GPT2EXP_ZSH_OLD" ] && _GPT2EXP_ZSH_OLD="$(for c in {commands}; do echo "$c=${_comps[$c]}"; done)"
elif ! complete -p {commands} 2>/dev/null | grep -q -w {function}; then  # installed twice: keep the first's
    export _GPT2EXP_OLD_COMP="$(complete -p {commands} 2>/dev/null)"
    {previous}
fi
{function}()
{
    local words=($COMP_LINE)
    if [ "${words[1]}" != "-m" ] || [ "${words[2]}" != "{module}" ]; then
        local previous
        case "${1##*/}" in
            {cases}
        esac
        if [ -n "$previous" ]; then "$previous" "$@"; fi
        return
    fi
    local rest="${COMP_LINE#*{module}}"
    local choices
    choices=$(COMP_POINT=$COMP_POINT COMP_LINE="{module}$rest" "${words[0]}" -m {module} -sc query=bash 2>/dev/null)
    COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "${words[$COMP_CWORD]}"))
}

COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
COMP_WORDBREAKS=$COMP_WORDBREAKS complete -o nospace -o default -F {function} {commands}
"""

UNINSTALL = """
complete -r {commands} 2>/dev/null
eval "$_GPT2EXP_OLD_COMP"
if [ -n "$ZSH_VERSION" ]; then
    for entry in ${(f)_GPT2EXP_ZSH_OLD}; do [ -n "${entry#*=}" ] && _comps[${entry%%=*}]="${entry#*=}"; done
fi
unset -f {function} _gpt2exp_completion_of
unset _GPT2EXP_OLD_COMP _GPT2EXP_ZSH_OLD {previous_names}
"""


def script(command: str) -> str | None:
    """The shell script for `-sc install=SHELL` / `-sc uninstall=SHELL` (bash, zsh), else None."""
    match = re.fullmatch(r"(install|uninstall)=(\w+)", command)
    if not match or match.group(2) not in SHELLS:
        return None
    names = {name: f"_GPT2EXP_PREVIOUS_{name}" for name in COMMANDS}
    fields = {
        "module": MODULE,
        "function": FUNCTION,
        "commands": " ".join(COMMANDS),
        "previous": "\n    ".join(f"{var}=$(_gpt2exp_completion_of {name})" for name, var in names.items()),
        "cases": "\n            ".join(f"{name}) previous=${var} ;;" for name, var in names.items()),
        "previous_names": " ".join(names.values()),
    }
    template = INSTALL if match.group(1) == "install" else UNINSTALL
    for key, value in fields.items():  # str.format would trip over the shell's braces
        template = template.replace("{" + key + "}", value)
    return template.lstrip("\n")


def module_install_script(argv: list[str], orig_argv: list[str]) -> str | None:
    """The script to print instead of Hydra's when this process is `python -m gpt2exp.train -sc
    (un)install=bash|zsh` (`argv`: sys.argv, `orig_argv`: sys.orig_argv); None otherwise: Hydra answers."""
    started_as_module = any(a == "-m" and b == MODULE for a, b in zip(orig_argv, orig_argv[1:], strict=False))
    if not started_as_module:
        return None
    args = argv[1:]
    if not any(flag in args for flag in ("-sc", "--shell-completion")):
        return None
    # Hydra reads `-sc` as a switch and the command as an override: install=bash, uninstall=zsh, query=bash
    return next((text for text in map(script, args) if text is not None), None)
