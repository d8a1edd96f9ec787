"""VoiceBench scoring: rule-based subsets (ifeval, advbench, openbookqa/mmsu, bbh) as VoiceBench scores them, and
the judge-scored subsets through any OpenAI-compatible endpoint."""
