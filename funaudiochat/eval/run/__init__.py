"""`funaudiochat eval run` / `eval merge`: sample suites, model adapters (local engine, OpenAI-compatible endpoint),
a resumable, shardable runner, and the report (markdown, JSON, PNG)."""
