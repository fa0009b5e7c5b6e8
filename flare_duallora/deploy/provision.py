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

Every participant then gets ``local/resources.json`` with the ``flare_duallora.`` class allow-list entry; every
site also gets the ``privacy.json`` scope that strips private keys from every task result (when ``sharing`` is
given) and, optionally, the plugin's own site settings (``site_policy``: ``local/flare_duallora.json``).  ``nvflare
provision`` and ``nvflare poc prepare`` (and ``PocEnv``) run it, so the kits are ready without editing files.
"""

from __future__ import annotations

from typing import Optional

from nvflare.lighter.spec import Builder

from flare_duallora.deploy.site_config import install_site_config, privacy_config

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
            install_site_config(ctx.get_local_dir(server))
        for client in project.get_clients():
            install_site_config(ctx.get_local_dir(client), privacy=scope, site_policy=self.site_policy)
