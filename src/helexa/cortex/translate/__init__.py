"""Client protocols cortex speaks besides OpenAI chat completions, translated to and from
them: Anthropic Messages and the OpenAI Responses API, and the tool sets they carry."""
