"""The MLflow pyfunc a consumer gets from `models:/NAME/VERSION`: base + adapter, prompts in, generations out.

model = mlflow.pyfunc.load_model("models:/default.tiny-cpu-adapter/1")  # <team>.<registered_model_name>
model.predict(["Reverse the word.\\n\\nabc"])          # -> ["cba"]
model.predict(pd.DataFrame({"instruction": [...], "input": [...]}))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc


class AdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tuneplane.pretrained import from_pretrained

        config = context.model_config
        model_dir = context.artifacts["model"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.template = config["template"]
        self.system_prompt = config.get("system_prompt") or None
        self.max_new_tokens = int(config.get("max_new_tokens", 64))
        if (Path(model_dir) / "adapter_config.json").exists():
            from peft import PeftModel

            # The base shipped with the model (embedded default), else loaded from where training found it.
            base = context.artifacts.get("base") or config["base_uri"]
            model = from_pretrained(AutoModelForCausalLM, base, dtype=torch.float32)
            self.model = PeftModel.from_pretrained(model, model_dir)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.eval()

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from tuneplane.data.formats import Conversation, Message
        from tuneplane.data.templates import SegmentTokenizer
        from tuneplane.generation import GENERATION_BATCH, generate, prompt_ids

        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        segments = SegmentTokenizer(self.tokenizer)
        prompts = []
        for instruction, extra in _as_records(model_input):
            messages = [Message("system", self.system_prompt)] if self.system_prompt else []
            # A placeholder answer: the prompt is everything before it, exactly as training rendered it.
            messages += [Message("user", instruction, extra), Message("assistant", "x")]
            prompts.append(prompt_ids(Conversation(tuple(messages)), self.template, self.tokenizer, segments))
        outputs: list[str] = []
        for i in range(0, len(prompts), GENERATION_BATCH):
            outputs += generate(self.model, self.tokenizer, prompts[i : i + GENERATION_BATCH], max_new)
        return outputs


def _as_records(model_input: Any) -> list[tuple[str, str]]:
    if hasattr(model_input, "to_dict"):  # a DataFrame: instruction/prompt column, optional input column
        rows = model_input.to_dict(orient="records")
        out = []
        for row in rows:
            text = row.get("instruction", row.get("prompt"))
            if text is None:
                raise ValueError("input needs an 'instruction' or 'prompt' column")
            out.append((str(text), str(row.get("input") or "")))
        return out
    if isinstance(model_input, str):
        return [(model_input, "")]
    return [(str(item), "") for item in model_input]
