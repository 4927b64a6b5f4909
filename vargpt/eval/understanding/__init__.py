"""Understanding benchmarks (MMBench, SEED-Bench, MMMU, POPE, MME): data readers, prompts, answer parsing, scoring.

Each benchmark module offers ``load_questions(path)`` (its official local format, documented in the module), the
prompt sent to the model (lmms-eval's ``doc_to_text``), and ``score(questions, predictions)``. ``runner`` reads
predictions (``{"id", "answer"}`` JSON lines), or generates them through the ``ChatModel`` protocol, and writes
per-sample records and a summary.
"""
