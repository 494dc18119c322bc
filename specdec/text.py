"""Text in and out of token ids for the user-facing paths: prompts (raw or through the chat template) and
the generated text as it streams, cut at stop strings.

`TextStream` decodes the committed ids after every verdict and hands out only text that is final: it holds
back a trailing partial UTF-8 character and any tail that could still grow into a stop string, so the
streamed pieces always add up to exactly the text a non-streamed request returns. Knows nothing about
gRPC or HTTP.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete multi-byte character


def encode_prompt(tokenizer, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids of a raw prompt, or of chat `messages` through the tokenizer's chat template (the assistant's
    turn opened). ValueError when the tokenizer has no chat template."""
    if messages is None:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use /v1/completions (or drop --chat)")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_around(tokenizer) -> tuple[str, str]:
    """(text before, text after) a single user message in the chat template, so a prompt cut to fit a token
    budget can be wrapped without re-applying the template."""
    marker = "\x00PROMPT\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    head, found, tail = text.partition(marker)
    if not found:
        raise ValueError("the chat template does not contain the user's message verbatim")
    return head, tail


class TextStream:
    """The decoded text of a growing list of generated ids, cut at the first stop string."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one appeared)
        self.stopped = False  # a stop string appeared
        self._sent = 0  # characters of self.text already handed out

    def push(self, ids: list[int]) -> str:
        """Add committed ids; -> the new final text (may be ''). Sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self.token_ids.extend(ids)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True
            return self._take(len(self.text))
        safe = len(self.text.rstrip(REPLACEMENT)) if self.text.endswith(REPLACEMENT) else len(self.text)
        for s in self.stop:  # a tail that is a prefix of a stop string may still become one
            for n in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._take(safe)

    def finish(self) -> str:
        """The rest of the text, once generation has ended."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self._sent)
        piece, self._sent = self.text[self._sent : end], end
        return piece
