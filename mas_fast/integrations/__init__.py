"""Adapters that fit MAS into existing training stacks.

- `mas_fast.integrations.avalanche.MASPlugin`: drop-in for Avalanche's MASPlugin
  (`pip install mas_fast[avalanche]`).
- `mas_fast.integrations.lightning.MASCallback`: a Lightning callback
  (`pip install mas_fast[lightning]`).
- `mas_fast.integrations.transformers.MASCallback`: a Hugging Face `Trainer` callback
  (`pip install mas_fast[transformers]`; docs/huggingface.md).

The optional ones are imported on demand so that `import mas_fast` never needs them.
"""
