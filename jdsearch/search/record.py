"""What a study records: the names of its attributes (study and trial level)."""

from __future__ import annotations

BASE_ATTR = "base_artifact"
POOL_ATTR = "pool_artifact"
SPEC_SYSATTR = "jdsearch:spec"  # the study spec, as a dict (a system attr: too long to print)
CATEGORIES_SYSATTR = "jdsearch:categories"  # [[COCO category id, name], ...] in label order 1..K
