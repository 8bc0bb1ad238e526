"""pgolf: the Parameter Golf pipeline's science (no orchestration lives here)."""
