"""SpeechFCEval scoring (SPEC §11): the BFCL AST checker and ACEBench's normal_checker, as the released scorer runs
them, over the released predictions format."""
