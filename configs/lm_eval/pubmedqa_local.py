"""The PubMedQA jsonl for configs/lm_eval/pubmedqa_local.yaml: $SPECDEC_PUBMEDQA (the variable the bench configs
read) or ../shared/data/pubmedqa/pubmedqa_pqal.jsonl, loaded with `datasets`' json builder (no Hub)."""

import os

import datasets


def load(**_metadata) -> datasets.DatasetDict:
    path = os.environ.get("SPECDEC_PUBMEDQA", "../shared/data/pubmedqa/pubmedqa_pqal.jsonl")
    return datasets.load_dataset("json", data_files={"test": path})
