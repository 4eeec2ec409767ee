"""``pipeline completion SHELL``: print the shell completion script Click generates."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "fish")


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL (bash, zsh or fish).

    Load it for this shell with ``eval "$(pipeline completion bash)"``, or save it where the shell
    reads completions (docs/operations.md).
    """
    comp_cls = get_completion_class(shell)
    assert comp_cls is not None  # every name in SHELLS is one Click ships
    # The script completes the installed console script, whatever name invoked this command.
    click.echo(comp_cls(ctx.find_root().command, {}, "pipeline", "_PIPELINE_COMPLETE").source())


def register(group: click.Group) -> None:
    group.add_command(completion)
