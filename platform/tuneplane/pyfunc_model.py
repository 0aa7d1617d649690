"""The MLflow pyfunc a consumer gets from `models:/NAME/VERSION`: base + adapter, prompts in, generations out.

model = mlflow.pyfunc.load_model("models:/tiny-cpu-adapter/1")
model.predict(["Reverse the word.\\n\\nabc"])          # -> ["cba"]
model.predict(pd.DataFrame({"instruction": [...], "input": [...]}))
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class AdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tuneplane.pretrained import local_copy

        config = context.model_config
        model_dir = context.artifacts["model"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.template = config["template"]
        self.system_prompt = config.get("system_prompt") or None
        self.max_new_tokens = int(config.get("max_new_tokens", 64))
        from pathlib import Path

        if (Path(model_dir) / "adapter_config.json").exists():
            from peft import PeftModel

            base = context.artifacts.get("base") or str(local_copy(config["base_uri"]))
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            self.model = PeftModel.from_pretrained(model, model_dir)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.eval()

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        import torch

        from tuneplane.data.formats import Conversation, Message
        from tuneplane.data.templates import SegmentTokenizer, render

        records = _as_records(model_input)
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        segments = SegmentTokenizer(self.tokenizer)
        stop = [self.tokenizer.eos_token_id] + [
            self.tokenizer.convert_tokens_to_ids(t)
            for t in ("<|im_end|>", "<|eot_id|>")
            if t in self.tokenizer.get_vocab()
        ]
        outputs = []
        for instruction, extra in records:
            messages = [Message("system", self.system_prompt)] if self.system_prompt else []
            # Render with a placeholder answer and keep only the prompt part: the exact training-time layout.
            messages += [Message("user", instruction, extra), Message("assistant", "x")]
            ids, labels = segments.encode(
                [render(Conversation(tuple(messages)), self.template, self.tokenizer)]
            )[0]
            prompt = ids[: int((labels != -100).argmax())].tolist()
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=torch.tensor([prompt]),
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=stop,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
            outputs.append(
                self.tokenizer.decode(out[0, len(prompt) :].tolist(), skip_special_tokens=True).strip()
            )
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
