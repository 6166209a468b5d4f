"""Serving classes: validated OpenAI requests in, engine requests out; engine events in, OpenAI responses out.

One serving class and one renderer per endpoint family (``chat``, ``completions``); what
they share is in ``base`` (limits, answering) and ``streams`` (choices, disconnects).
"""

from server.serving.base import OpenAIServing, Prepared
from server.serving.chat import ChatServing
from server.serving.completions import CompletionServing

__all__ = ["ChatServing", "CompletionServing", "OpenAIServing", "Prepared"]
