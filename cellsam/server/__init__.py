"""``cellsam serve``: a browser app to segment, correct, export and fine-tune (needs ``cellsam[serve]``).

Modules: :mod:`.app` (``create_app``), :mod:`.access` (token, Host and Origin checks),
:mod:`.routes_images` / :mod:`.routes_edit` / :mod:`.routes_jobs` (API routes), :mod:`.schemas`
(pydantic models), :mod:`.session` (model + embedding cache), :mod:`.storage` / :mod:`.records` (the
SQLite project), :mod:`.edits` (label edits), :mod:`.images` (uploads, display), :mod:`.export`,
:mod:`.finetune`; the page is in ``static/``. Nothing here is imported by ``import cellsam``.
"""
