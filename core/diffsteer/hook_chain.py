"""Chained hooks: each implementation receives the previous one's result, with pluggy wrappers honoured.

pluggy passes one set of arguments to every implementation, so a hook whose value flows from plugin to
plugin in list order (the initial latents, a branch's embeddings) is called here, one implementation at a
time. Wrappers (``@hookimpl(wrapper=True)`` and the old ``hookwrapper=True``) wrap the whole chain as they
wrap any pluggy hook: outermost first in list order, they see the value going in and the chain's result
coming out, and a new-style wrapper may return a replacement.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TypeVar

import pluggy

from .errors import PluginError

T = TypeVar("T")


def _owner(impl: Any) -> str:
    plugin = impl.plugin
    return getattr(plugin, "name", "") or type(plugin).__name__


def is_wrapper(impl: Any) -> bool:
    """Whether a pluggy hook implementation is a wrapper (new- or old-style)."""
    return bool(getattr(impl, "wrapper", False) or getattr(impl, "hookwrapper", False))


def chain(
    hook_caller: Any,
    value_arg: str,
    value: T,
    *,
    check: Optional[Callable[[str, T], None]] = None,
    blend_in: Optional[Callable[[Any, T, T], T]] = None,
    **kwargs: Any,
) -> T:
    """Call ``hook_caller`` so that each implementation receives the previous one's result as ``value_arg``.

    An implementation returning ``None`` keeps the value; ``check(owner, result)`` vets every other result
    (it raises to refuse one) and ``blend_in(plugin, before, result)`` may then temper it (a region).
    Returns the last value.
    """
    # get_hookimpls() lists plain implementations, then wrappers, each in reverse call order.
    impls = list(reversed(hook_caller.get_hookimpls()))
    wrappers = [i for i in impls if is_wrapper(i)]
    plain = [i for i in impls if not is_wrapper(i)]

    def call_one(impl: Any, current: Any) -> Any:
        args = {**kwargs, value_arg: current}
        return impl.function(**{name: args[name] for name in impl.argnames})

    def inner(current: Any) -> Any:
        for impl in plain:
            result = call_one(impl, current)
            if result is not None:
                if check is not None:
                    check(_owner(impl), result)
                current = result if blend_in is None else blend_in(impl.plugin, current, result)
        return current

    return _wrapped(wrappers, call_one, inner, value)


def _wrapped(wrappers: Sequence[Any], call_one: Callable[[Any, Any], Any], inner: Callable[[Any], Any], value: Any) -> Any:
    if not wrappers:
        return inner(value)
    impl, rest = wrappers[0], wrappers[1:]
    gen = call_one(impl, value)
    try:
        next(gen)
    except (StopIteration, TypeError):
        raise PluginError(_owner(impl), f"wrapper {impl.function.__name__} must be a generator that yields once") from None
    if getattr(impl, "wrapper", False):
        try:
            result = _wrapped(rest, call_one, inner, value)
        except BaseException as exc:  # the wrapper may handle it (returning a value) or re-raise
            try:
                gen.throw(exc)
            except StopIteration as stop:
                return value if stop.value is None else stop.value
            raise PluginError(_owner(impl), f"wrapper {impl.function.__name__} yielded more than once") from None
        try:
            gen.send(result)
        except StopIteration as stop:  # as for plain implementations, None keeps the value
            return result if stop.value is None else stop.value
        raise PluginError(_owner(impl), f"wrapper {impl.function.__name__} yielded more than once")
    # Old-style hookwrapper: it receives a pluggy.Result and may force another result on it.
    outcome = pluggy.Result.from_call(lambda: _wrapped(rest, call_one, inner, value))
    try:
        gen.send(outcome)
    except StopIteration:
        return outcome.get_result()
    raise PluginError(_owner(impl), f"hookwrapper {impl.function.__name__} yielded more than once")
