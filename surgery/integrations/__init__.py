"""Use surgery's students with the tools their users already have (each integration imports its
library only when used: ``surgery.integrations.sentence_transformers`` needs sentence-transformers)."""
