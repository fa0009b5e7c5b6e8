"""A provisioning builder that installs this plugin's site configuration into every startup kit.

Name it in a ``project.yml`` after ``StaticFileBuilder`` (which writes ``local/resources.json.default``)::

    builders:
      - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
        args: {template_file: [master_template.yml, aws_template.yml, azure_template.yml]}
      - path: nvflare.lighter.impl.static_file.StaticFileBuilder
        args: {config_folder: config}
      - path: flare_duallora.deploy.provision.SiteConfigBuilder
        args: {sharing: {method: duallora, head: [vit.classification_head]}}
      - path: nvflare.lighter.impl.cert.CertBuilder
      - path: nvflare.lighter.impl.signature.SignatureBuilder

Every participant then gets ``local/resources.json`` whose class allow-list names the exact classes of the
plugin's runtime components (:data:`~flare_duallora.deploy.site_config.RUNTIME_CLASSES`, no package prefix); every
site also gets the ``privacy.json`` scope that strips private keys from every task result (when ``sharing`` is
given) and, optionally, the plugin's own site settings (``site_policy``: ``local/flare_duallora.json``: the bundles,
data folders and state folders jobs may use).  ``nvflare
provision`` and ``nvflare poc prepare`` (and ``PocEnv``) run it, so the kits are ready without editing files.
"""

from __future__ import annotations

from typing import Optional

import json
from pathlib import Path

from nvflare.lighter.spec import Builder

from flare_duallora.deploy.site_config import install_site_config, merge_allow_list, privacy_config

__all__ = ["SiteConfigBuilder"]


class SiteConfigBuilder(Builder):
    """Args: ``sharing`` (the sharing rule of the privacy scope; None: no scope), ``privacy`` (install the scope),
    ``on_private`` (``strip`` | ``block``), ``site_policy`` (the sites' ``flare_duallora.json``, or None)."""

    def __init__(self, sharing: Optional[dict] = None, privacy: bool = True, on_private: str = "strip",
                 site_policy: Optional[dict] = None):
        self.sharing = sharing
        self.privacy = privacy
        self.on_private = on_private
        self.site_policy = site_policy

    def build(self, project, ctx):
        scope = privacy_config(self.sharing, self.on_private) if self.privacy and self.sharing else None
        server = project.get_server()
        if server is not None:
            _install(ctx.get_local_dir(server))
        for client in project.get_clients():
            _install(ctx.get_local_dir(client), privacy=scope, site_policy=self.site_policy)


def _install(local_dir: str, **kw) -> None:
    """The site configuration, with the allow-list entries also in ``resources.json.default``: ``nvflare poc
    prepare`` (and ``PocEnv``) rewrite the server's ``resources.json`` from the default file after provisioning."""
    install_site_config(local_dir, **kw)
    default = Path(local_dir) / "resources.json.default"
    if default.is_file():
        config = json.loads(default.read_text())
        if isinstance(config.get("class_allow_list"), list):
            default.write_text(json.dumps(merge_allow_list(config), indent=2))
