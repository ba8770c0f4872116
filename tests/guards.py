"""Source code that test subprocesses run first: after it, importing torch or transformers fails,
so whatever the subprocess imports next proves it needs neither (the device install's promise)."""

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def one_line_error(args) -> str:
    """Run `edgellm ARGS` in-process; assert it failed with exit 2 and one `error:` line; that line."""
    from typer.testing import CliRunner

    from edgellm.cli import app

    r = CliRunner().invoke(app, args)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]
