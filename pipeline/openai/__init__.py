"""The OpenAI arm (optional, paper appendix A.4; DVC stages openai_base, openai_finetune,
openai_collect): fine-tune OpenAI models on a training split, then score them, and their base
versions, on the validation split like every other model.

    python -m pipeline.openai --base-model gpt-4o-mini-2024-07-18 \\
        --train data/splits/train_100.parquet --val data/splits/val.parquet   # fine-tune + evaluate
    python -m pipeline.openai --base-model gpt-4o-mini-2024-07-18 \\
        --val data/splits/val.parquet                                         # the base model only
    python -m pipeline.openai --collect     # metrics/openai/*.json for the report
    python -m pipeline.openai ... --cancel  # cancel this training set's job

Off unless `openai.enabled` is true; off, it only writes `status.json` {"status": "not_run"}
and exits 0 (the demo's DVC stages take a second, and the report lists the models as not run).

A fine-tuning run, in order (each step is skipped when it was done before, see "Idempotence"):

1. the chat JSONL: per training row [system: the concise prompt, user: question, assistant:
   answer] (appendix A.5), checked against the API's limits before anything is sent: at least
   10 examples, file size <= `openai.max_file_mb`, every line a valid chat, no example over
   `openai.max_example_tokens` (4 characters a token); a violation is one line, nothing uploaded;
2. the price check and, before a job is created, the training cost estimate against the cap;
   `files.create(purpose="fine-tune")` (and the validation split with `openai.validation_file`);
3. `fine_tuning.jobs.create` with `method={"type": "supervised", "supervised": {"hyperparameters":
   {n_epochs, batch_size, learning_rate_multiplier}}}`, `seed`, a `suffix` and `metadata` that
   carry the job's identity digest;
4. polling with backoff (`poll_interval_s`, doubled after each poll that brought nothing new, up
   to `poll_max_interval_s`), streaming the job's events into the MLflow run as they arrive
   (train/valid loss and token accuracy per step), then the checkpoints' metrics and the result
   file (step_metrics.csv, which the API serves base64-encoded), logged as an artifact;
5. the fine-tuned model id: a tag of the run, status.json and the metrics record;
6. evaluation through chat completions with the concise prompt (the base model: the verbose one),
   through the generator's client (pipeline.core.llmclient: concurrency, rate limits, retries,
   a durable response cache, so a re-run pays for nothing already answered), scored by the same
   code as the LoRA adapters (pipeline.core.predictions.score_answers + pipeline.core.evalmetrics).

Idempotence. A job is identified by (base model, sha256 of the training file [and of the
validation file], method and hyperparameters, seed): the identity digest. Every file id, job id
and MLflow run id is appended (and fsynced) to the ledger `data/openai/jobs.jsonl` the moment it
exists, per endpoint. A re-run reuses them: a recorded job is polled again, never created twice;
a recorded file is not uploaded again. A crash between upload and job creation, or while the
creation's reply was on its way, leaves the remote side ahead of the ledger: before uploading or
creating, the remote lists are searched (files by name `tonetune-<role>-<sha256[:16]>.jsonl`,
jobs by `metadata.tonetune_identity`), so a job is adopted, not paid for again, even without the
ledger (another machine, a `dvc exp run --temp` workspace). Job creation is sent without the
SDK's automatic retries; after a timeout or connection error the job list is checked before the
request is repeated. A failed or cancelled job stays the answer for its identity (the stage exits
non-zero with the API's error message) until `--new-job` asks for a new, paid one.

Outputs: `reports/openai/<model>/` (status.json, train.jsonl, step_metrics.csv, predictions.parquet,
metrics.json) per model; `--collect` copies the metrics records of the current params' models to
`metrics/openai/<model>.json`, where the report reads them. Model names: `openai-<base model>` and
`openai-<base model>-n<training rows>`. MLflow: one run per model under those names, beside the
LoRA runs. The API key comes from OPENAI_API_KEY only; it goes to the HTTP client and nowhere else.

Money. Every base model must have a price in `openai.client.prices` (input, output and training
per million tokens) before anything is sent, unless `openai.client.allow_unpriced: true`; a
fine-tuned `ft:<base>:...` model is priced as its base. A job whose estimated training cost
(training file tokens x epochs x training price) is above `openai.max_training_cost_usd` is
refused before it is created; the evaluation's chat calls reserve their worst case against
`openai.client.max_cost_usd`. Provider tolerance: see api.py.

Modules (each imports only pipeline.core and this package): spec.py (names, the chat JSONL and
its checks, the job identity, prices and budget), api.py (the API calls, errors, optional
routes, the retry helper), ledger.py (the job ledger), jobs.py (files, job creation, following,
results), tracking.py (MLflow runs and step metrics), evaluation.py (chat evaluation and
scoring), collect.py (`--collect`), stage.py (the command line and one invocation).

Not done here: Azure OpenAI serves a fine-tuned model only after it is deployed; pass the
deployment name with `--eval-model` to evaluate it there.
"""
