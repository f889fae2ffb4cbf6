"""A host whose plan uses containers but whose GPU facts list no GPU: the toolkit role must leave it alone."""

# By group, so that the trixie scenario (molecule/trixie_host_roles) runs these tests on its own hosts.
testinfra_hosts = ["ansible://h3_nogpu_hosts"]


def test_toolkit_not_installed(host):
    assert not host.package("nvidia-container-toolkit").is_installed
    assert not host.exists("nvidia-ctk")


def test_toolkit_repository_not_added(host):
    assert not host.file("/etc/apt/sources.list.d/nvidia-container-toolkit.list").exists
    assert not host.file("/etc/apt/keyrings/nvidia-container-toolkit.asc").exists
