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
