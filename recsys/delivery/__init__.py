"""Progressive delivery of served models: canary and A/B rollouts, feedback, statistics."""
