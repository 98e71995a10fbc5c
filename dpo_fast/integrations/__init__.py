"""Integrations with other training libraries (imported on demand: `dpo_fast.integrations.trl`)."""
