"""``image-proxy inspect``: what a consumer learns about an image."""

from __future__ import annotations

import msgspec

from proxy.client import ProxyProcess


async def inspect_image(image: str, *, raw: bool, proxy_args: list[str]) -> str:
    """A human-readable summary of ``image``, or its stored manifest."""
    async with ProxyProcess.spawn(proxy_args) as proxy:
        await proxy.legacy.initialize()
        rpc = await proxy.legacy.open_rpc()
        try:
            await rpc.initialize()
            image_id = await rpc.open_image(image)
            assert image_id is not None
            # As skopeo inspect does, name the manifest the reference points
            # at (an index for a multi-platform image), and describe the
            # instance chosen for this platform.
            named = await rpc.get_manifest(image_id, resolve=False)
            if raw:
                return named.manifest
            manifest = await rpc.get_manifest(image_id)
            config = await rpc.get_config(image_id)
            layers = await rpc.get_layer_info(image_id)
        finally:
            await rpc.aclose()
    document = msgspec.json.decode(config.config)
    runtime = document.get("config") or {}
    platform = "/".join(
        part
        for part in (
            document.get("os"),
            document.get("architecture"),
            document.get("variant"),
        )
        if part
    )
    lines = [
        f"Name:       {image}",
        f"Digest:     {named.digest}",
        f"MediaType:  {named.media_type}",
    ]
    if manifest.digest != named.digest:
        lines += [
            f"Instance:   {manifest.digest}",
            f"  MediaType: {manifest.media_type}",
        ]
    lines += [
        f"Platform:   {platform}",
        f"Created:    {document.get('created', '')}",
        f"Config:     {config.digest}",
    ]
    for key in ("Entrypoint", "Cmd", "Env", "WorkingDir", "User", "Labels"):
        if runtime.get(key):
            lines.append(f"  {key}: {msgspec.json.encode(runtime[key]).decode()}")
    lines.append(f"Layers:     {len(layers)}")
    for layer in layers:
        lines.append(f"  {layer.digest}  {layer.size} bytes  {layer.media_type}")
        lines.append(f"    diffID {layer.diff_id}")
    return "\n".join(lines)
