"""Jinja templates of the Hub cards that `saev_hf.hub` renders: `saev_model_card.md` (an SAE-V's model card) and
`filtered_dataset_card.md` (the card of a dataset filtered by an SAE-V score).

This top-level folder is installed as the package `saev_hf.hub_cards` (see `[tool.setuptools]` in pyproject.toml), so
the one copy of the templates here is what wheels ship and editable installs read. Template variables are documented
by the functions that fill them, `saev_hf.hub.saev_model_card` and `saev_hf.hub.filtered_dataset_card`.
"""
