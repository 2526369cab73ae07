"""Shell completion scripts for bash, zsh and fish, made from the parser's command tree.

Completion covers commands, subcommands, options and the fixed choices (output formats, shells);
it never calls the allocator, so pool and node names are not completed.
"""

from __future__ import annotations

from coilctl.cli import OUTPUTS, SHELLS, CommandTree

# Options that take a value: the word after them is not a command.
VALUE_OPTIONS = ("--allocator", "--timeout", "--tls-ca", "--tls-cert", "--tls-key", "--subnet")
FILE_OPTIONS = ("--tls-ca", "--tls-cert", "--tls-key")

_BASH = """\
# bash completion for coilctl. Load it with:  source <(coilctl completion bash)
_coilctl() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local cmd="" sub="" w i skip=0 words=""
    case "$prev" in
        -o|--output) COMPREPLY=($(compgen -W "%(outputs)s" -- "$cur")); return ;;
        %(file_options)s) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        %(value_options)s) COMPREPLY=(); return ;;
    esac
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        if ((skip)); then skip=0; continue; fi
        case "$w" in
            %(value_options)s|-o|--output) skip=1 ;;
            -*) ;;
            *) if [[ -z $cmd ]]; then cmd=$w; elif [[ -z $sub ]]; then sub=$w; fi ;;
        esac
    done
    case "$cmd" in
        "") words="%(commands)s" ;;
%(cases)s
    esac
    if [[ $cur == -* ]]; then
        words="$words %(global_options)s"
    fi
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -F _coilctl coilctl
"""

_ZSH_HEAD = """\
#compdef coilctl
# zsh completion for coilctl. Load it with:  source <(coilctl completion zsh)
# It reuses the bash completion through zsh's bashcompinit.
autoload -U +X compinit && compinit
autoload -U +X bashcompinit && bashcompinit
"""


def _bash_cases(tree: CommandTree) -> str:
    lines = []
    for command, subs in tree.commands.items():
        if command == "completion":
            lines.append(f'        completion) [[ -z $sub ]] && words="{" ".join(SHELLS)}" ;;')
            continue
        if list(subs) == [""]:
            lines.append(f'        {command}) words="{" ".join(_with_short(subs[""]))}" ;;')
            continue
        lines.append(f"        {command})")
        lines.append('            case "$sub" in')
        lines.append(f'                "") words="{" ".join(subs)}" ;;')
        for sub, options in subs.items():
            lines.append(f'                {sub}) words="{" ".join(_with_short(options))}" ;;')
        lines.append("            esac ;;")
    return "\n".join(lines)


def _with_short(options: list[str]) -> list[str]:
    short = {"--output": "-o", "--yes": "-y"}
    return [s for o in options for s in ((short[o], o) if o in short else (o,))]


def bash(tree: CommandTree) -> str:
    return _BASH % {
        "outputs": " ".join(OUTPUTS),
        "file_options": "|".join(FILE_OPTIONS),
        "value_options": "|".join(VALUE_OPTIONS),
        "commands": " ".join(tree.commands),
        "cases": _bash_cases(tree),
        "global_options": " ".join(tree.global_options),
    }


def zsh(tree: CommandTree) -> str:
    return _ZSH_HEAD + bash(tree)


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fish(tree: CommandTree) -> str:
    out = [
        "# fish completion for coilctl. Load it with:  coilctl completion fish | source",
        "complete -c coilctl -f",
    ]
    top = " ".join(tree.commands)
    for command, subs in tree.commands.items():
        out.append(
            f"complete -c coilctl -n 'not __fish_seen_subcommand_from {top}' -a {command} "
            f"-d {_fish_quote(tree.help[command])}"
        )
        named = [s for s in subs if s]
        for sub in named:
            out.append(
                f"complete -c coilctl -n '__fish_seen_subcommand_from {command}; and not "
                f"__fish_seen_subcommand_from {' '.join(named)}' -a {sub} "
                f"-d {_fish_quote(tree.help[f'{command} {sub}'])}"
            )
        for sub, options in subs.items():
            cond = f"__fish_seen_subcommand_from {command}"
            if sub:
                cond += f"; and __fish_seen_subcommand_from {sub}"
            for option in options:
                spec = f"-l {option.removeprefix('--')}"
                if option == "--output":
                    spec = f"-s o {spec} -x -a {_fish_quote(' '.join(OUTPUTS))}"
                elif option == "--yes":
                    spec = f"-s y {spec}"
                elif option in VALUE_OPTIONS:
                    spec += " -x"
                out.append(f"complete -c coilctl -n {_fish_quote(cond)} {spec}")
    out.append(
        "complete -c coilctl -n '__fish_seen_subcommand_from completion' -x "
        f"-a {_fish_quote(' '.join(SHELLS))}"
    )
    for option in tree.global_options:
        spec = f"-l {option.removeprefix('--')}"
        spec += " -r -F" if option in FILE_OPTIONS else " -x"
        out.append(f"complete -c coilctl {spec}")
    return "\n".join(out) + "\n"


SCRIPTS = {"bash": bash, "zsh": zsh, "fish": fish}


def script(shell: str, tree: CommandTree) -> str:
    """The completion script for `shell` (one of SHELLS); KeyError for another."""
    return SCRIPTS[shell](tree)
