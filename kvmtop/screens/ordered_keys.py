"""Keys in order: an App that hands the terminal's keys to its screens one at a time, each to
the screen on show once the key before it has done all it does.

Textual routes each key to the focused widget as it arrives. Keys that arrive in one burst (a
paste, keys coalesced over SSH or by tmux) are all routed before the first one's action runs,
so a key typed right after one that opens a screen (`a`, Enter, `k`) ran on the old screen, or
on the new one before it could act (`d` while the attach was under way). Here a key is routed
once the one before it has gone through the widgets it went to, and once more behind what
its action asked of them (a screen pushed in answer to a message). A screen change that takes
longer (an attach, a thread taking KVM's counters) holds the keys until it is done: they then
act on the screen it opened, in the order typed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from textual import events
from textual.app import App
from textual.message import Message
from textual.message_pump import MessagePump
from textual.timer import Timer

LOST_AFTER_S = 1.0  # a key whose passage is not reported by then (its widget went away): done
HOLD_AT_MOST_S = 15.0  # a screen change taking longer lets the keys through to the screen shown
HOLD_POLL_S = 0.02


class KeyPassed(Message):
    """Sent behind a key, along the way it went: when it reaches the app, so has the key."""

    def __init__(self, serial: int, target: MessagePump, second: bool = False) -> None:
        super().__init__()
        self.serial = serial
        self.target = target  # the focused widget, or the screen, the key was routed to
        self.second = second  # sent behind what the key's action posted on that way


class OrderedKeysApp(App[int]):
    def __init__(self) -> None:
        super().__init__()
        self._waiting_keys: deque[events.Key] = deque()
        self._key_serial = 0
        self._key_under_way = False
        self._key_screen: object = None  # the screen on show when the last key was routed
        self._hold: Callable[[], bool] | None = None  # true once the screen change is done
        self._hold_until = 0.0
        self._hold_timer: Timer | None = None

    @property
    def keys_pending(self) -> bool:
        """Keys typed are still waiting to act, or one is acting."""
        return self._key_under_way or self._hold is not None or bool(self._waiting_keys)

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key) and not event.is_forwarded:  # from the terminal
            if self._key_under_way or self._hold is not None or self._waiting_keys:
                self._waiting_keys.append(event)
            else:
                await self._route_key(event)
            return
        await super().on_event(event)

    async def _route_key(self, key: events.Key) -> None:
        screen = self._key_screen = self._on_show
        if screen is None:
            return  # quitting: no screen for it
        target: MessagePump = self.focused or self.screen
        self._key_serial += 1
        serial = self._key_serial
        self._key_under_way = True
        self.set_timer(LOST_AFTER_S, lambda: self._key_done(serial))
        await super().on_event(key)  # a priority binding, or on to the focused widget
        if self._on_show is not screen or not target.post_message(KeyPassed(serial, target)):
            self._key_done(serial)

    @property
    def _on_show(self) -> object:
        """The screen on show (None once the app has closed them all, as it quits)."""
        return self.screen_stack[-1] if self.screen_stack else None

    def on_key_passed(self, passed: KeyPassed) -> None:
        passed.stop()
        if passed.serial != self._key_serial or not self._key_under_way:
            return
        if passed.second or self._key_screen is not self._on_show:  # a screen came or went
            self._key_done(passed.serial)
        elif not passed.target.post_message(KeyPassed(passed.serial, passed.target, True)):
            self._key_done(passed.serial)

    def _key_done(self, serial: int) -> None:
        if serial == self._key_serial and self._key_under_way:
            self._key_under_way = False
            self.call_next(self._route_waiting)

    async def _route_waiting(self) -> None:
        if not self._key_under_way and self._hold is None and self._waiting_keys:
            await self._route_key(self._waiting_keys.popleft())

    def hold_keys(self, until: Callable[[], bool]) -> None:
        """Keep the keys typed from now on until ``until()`` is true (the screen a key asked for
        is on show, or it will not be), then route them in order."""
        self._hold = until
        self._hold_until = time.monotonic() + HOLD_AT_MOST_S
        if self._hold_timer is None:
            self._hold_timer = self.set_interval(HOLD_POLL_S, self._check_hold)

    def _check_hold(self) -> None:
        hold = self._hold
        if hold is not None and not hold() and time.monotonic() < self._hold_until:
            return
        self._hold = None
        if self._hold_timer is not None:
            self._hold_timer.stop()
            self._hold_timer = None
        self.held_keys_released()
        self.call_next(self._route_waiting)

    def held_keys_released(self) -> None:
        """Called as a hold ends, before its keys are routed: a subclass tidies the screens."""
