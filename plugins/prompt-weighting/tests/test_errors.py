"""Bad input: prompts that do not parse give a PluginError naming the plugin, the prompt and the position, before
any denoising; bad settings give a SettingsError naming the field."""

from __future__ import annotations

import re

import pytest

from diffsteer import Plugin, PluginError, SettingsError, hookimpl
from diffsteer_prompt_weighting import PromptSyntaxError, PromptWeighting, parse_compel


class _Steps(Plugin):
    name = "steps"

    def __init__(self, log):
        super().__init__()
        self.log = log

    @hookimpl
    def diffsteer_pre_step(self, call, step):
        self.log.append(step.index)


def run(pipe, prompt, settings=None, **kw):
    log: list[int] = []
    args = dict(num_inference_steps=2, seed=0, output_type="latent")
    args.update(kw)
    try:
        pipe(prompt, plugins=[PromptWeighting(**(settings or {})), _Steps(log)], **args)
    finally:
        assert log == [] or "expect_steps" in kw  # errors come before any denoising step


@pytest.mark.parametrize(
    "prompt, syntax, message, caret",
    [
        ("a (red circle on a white background", "compel", "unbalanced '(': no ')' closes it", 2),
        ("a red) circle", "compel", "unbalanced ')': no '(' opens it", 5),
        ('a "red circle', "compel", "unterminated '\"'", 2),
        ("a (red)1.2.3 circle", "compel", "bad weight '1.2.3'", 7),
        ("a (red)-0.5 circle", "compel", "negative weights are not allowed", 7),
        ('("a", "b").blend(0.7)', "compel", ".blend() has 2 prompts but 1 weights", 17),
        ('("a", "b").blend(0.7, x)', "compel", "bad weight 'x' in .blend()", 22),
        ('("a", "b").blend(1, 1) and more', "compel", ".blend() must be the whole prompt", 23),
        ("a red.swap(blue) circle", "compel", ".swap()", 5),
        ("a (red circle:1.5", "a1111", "unbalanced '(': no ')' closes it", 2),
        ("a (red:x1.5) circle", "a1111", "bad weight 'x1.5'", 7),
        ("a red] circle", "a1111", "unbalanced ']'", 5),
    ],
)
def test_prompt_errors_name_plugin_and_position(tiny_pipe, prompt, syntax, message, caret):
    with pytest.raises(PluginError, match=re.escape(message)) as info:
        run(tiny_pipe, prompt, {"syntax": syntax})
    text = str(info.value)
    print(text)
    assert text.startswith("plugin 'prompt-weighting': cannot parse the prompt:")
    assert f"(character {caret + 1}, {syntax} syntax)" in text
    lines = text.splitlines()
    assert lines[-2].strip() == prompt.strip() and lines[-1].index("^") - 4 == caret


def test_negative_prompt_errors_say_which_prompt(tiny_pipe):
    with pytest.raises(PluginError, match=r"cannot parse the negative prompt: unbalanced '\('"):
        run(tiny_pipe, "a red circle", negative_prompt="a (blue square")


def test_long_prompts_point_near_the_mistake():
    prompt = " ".join(["a red circle on the left"] * 20) + " (a blue square"
    with pytest.raises(PromptSyntaxError) as info:
        parse_compel(prompt)
    line, caret = str(info.value).splitlines()[-2:]
    assert line.startswith("    ...") and line[caret.index("^")] == "("


def test_error_is_a_value_error_for_callers():
    with pytest.raises(ValueError):
        parse_compel("(oops")


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"syntax": "markdown"}, "syntax"),
        ({"min_chunks": 0}, "min_chunks"),
        ({"min_chunks": "many"}, "min_chunks"),
        ({"truncate_long_prompts": "sometimes"}, "truncate_long_prompts"),
        ({"sytnax": "a1111"}, "sytnax"),
    ],
)
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(SettingsError, match=rf"prompt-weighting\.{field}:") as info:
        PromptWeighting(**settings)
    assert info.value.plugin == "prompt-weighting"


def test_bad_settings_by_entry_point_name(tiny_pipe):
    with pytest.raises(SettingsError, match=r"prompt-weighting\.syntax: Input should be 'compel' or 'a1111'"):
        tiny_pipe("a red circle", num_inference_steps=1, plugins=[("prompt-weighting", {"syntax": "A1111!"})])
