"""One module per upstream kind; `build_adapter` picks the one a deployment names."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing aiohttp takes ~0.25 s: the CLI reads adapters.types without it
    from adapters.http import UpstreamClient
    from adapters.types import Adapter, Upstream


def build_adapter(upstream: Upstream, client: UpstreamClient) -> Adapter:
    provider = upstream.provider
    if provider == "echo":
        from adapters.echo import EchoAdapter

        return EchoAdapter(upstream)
    if provider == "openai":
        from adapters.openai import OpenAIAdapter

        return OpenAIAdapter(upstream, client)
    if provider == "azure":
        from adapters.openai import AzureOpenAIAdapter

        return AzureOpenAIAdapter(upstream, client)
    if provider == "anthropic":
        from adapters.anthropic import AnthropicAdapter

        return AnthropicAdapter(upstream, client)
    if provider == "ollama":
        from adapters.ollama import OllamaAdapter

        return OllamaAdapter(upstream, client)
    # --- bedrock ---
    if provider == "bedrock":
        from adapters.bedrock import BedrockAdapter

        return BedrockAdapter(upstream, client)
    # --- end bedrock ---
    # --- gemini / vertex (issue 18)
    if provider == "gemini":
        from adapters.gemini import GeminiAdapter

        return GeminiAdapter(upstream, client)
    if provider == "vertex":
        from adapters.vertex import vertex_adapter

        return vertex_adapter(upstream, client)
    # --- end gemini / vertex
    raise ValueError(f"unknown provider {provider!r}")
