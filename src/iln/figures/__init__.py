"""How results look: one name and colour per normalisation, and figure helpers."""
