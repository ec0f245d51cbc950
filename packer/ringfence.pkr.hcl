# A GitHub Actions runner VM image that boots with ringfence loaded, attached and pinned
# before the runner service starts (packer/README.md). Packer 1.6+ (Debian 12's packer is
# 1.6.6: builtin qemu and amazon-ebs builders, so no required_plugins block).
#
#   Real fleet (AWS):  cd packer && packer build -only=amazon-ebs.fleet \
#                        -var ringfence_binary=../target/release/ringfence ringfence.pkr.hcl
#   Local (qemu):      packer/build   (makes the base disk, then runs the qemu source)
#
# Both sources run the same provisioning scripts (provision/). Paths are relative to the
# directory packer runs in: run it from packer/.

variable "ringfence_binary" {
  type        = string
  default     = "../target/release/ringfence"
  description = "The ringfence binary to install (cargo build --release --locked)."
}

variable "runner_user" {
  type        = string
  default     = "runner"
  description = "The user the GitHub Actions runner runs as (created if missing; the hooks' sudoers line names it)."
}

# ---------------------------------------------------------------- amazon-ebs (real fleets)

variable "aws_region" {
  type    = string
  default = "us-east-1"
}

variable "aws_instance_type" {
  type        = string
  default     = "t3.small"
  description = "The instance the image is built on (not the fleet's size)."
}

variable "ami_name_prefix" {
  type    = string
  default = "ringfence-runner"
}

# ---------------------------------------------------------------- qemu (local, packer/build)

variable "base_disk" {
  type        = string
  default     = "out/base/base.qcow2"
  description = "The Debian 12 base disk packer/build makes with debootstrap."
}

variable "kernel" {
  type    = string
  default = "out/base/vmlinuz"
}

variable "initrd" {
  type    = string
  default = "out/base/initrd.img"
}

variable "ssh_private_key_file" {
  type        = string
  default     = "out/base/id_ed25519"
  description = "The key packer/build made for this base disk (root's authorized key)."
}

variable "accelerator" {
  type        = string
  default     = "tcg"
  description = "kvm where the host can run guests; tcg (emulation) where it cannot."
}

variable "output_directory" {
  type    = string
  default = "out/image"
}

variable "standin_runner" {
  type        = bool
  default     = false
  description = "Install the stand-in runner unit (actions.runner.test.service) for packer/test; packer/build sets it."
}

locals {
  # The AMI name must be unique: the build time, digits only.
  stamp = regex_replace(timestamp(), "[- TZ:]", "")
  # Where the file provisioners put the payload, and the provisioning scripts read it.
  payload = "/tmp/ringfence-image"
}

source "amazon-ebs" "fleet" {
  region        = var.aws_region
  instance_type = var.aws_instance_type
  # Debian's own Debian 12 AMIs (account 136693071363 publishes them), the newest.
  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["136693071363"]
    most_recent = true
  }
  ssh_username = "admin"
  ami_name     = "${var.ami_name_prefix}-${local.stamp}"
  tags = {
    Name      = "${var.ami_name_prefix}-${local.stamp}"
    ringfence = "pinned before the runner"
  }
}

# Direct-kernel boot: the base disk is one ext4 file system (no partition table, no boot
# loader), and qemu is given the Debian kernel and initrd packer/build copied out of it.
# Installing GRUB into a disk image from the host needs loop or nbd devices and the host's
# GRUB modules, and every boot under emulation would also pay for firmware disk reads and
# the GRUB menu; the image is for local tests only (a real fleet boots the amazon-ebs AMI,
# which brings its own boot loader). The kernel and initrd are kept beside the image.
source "qemu" "local" {
  iso_url          = var.base_disk
  iso_checksum     = "none"
  disk_image       = true
  use_backing_file = false
  skip_resize_disk = true
  skip_compaction  = true
  format           = "qcow2"
  disk_interface   = "virtio"
  net_device       = "virtio-net"
  accelerator      = var.accelerator
  cpus             = 2
  memory           = 1024
  headless         = true
  output_directory = var.output_directory
  vm_name          = "ringfence-runner.qcow2"
  qemuargs = [
    ["-kernel", var.kernel],
    ["-initrd", var.initrd],
    ["-append", "root=/dev/vda rw console=ttyS0"],
    ["-cpu", var.accelerator == "kvm" ? "host" : "max"],
    ["-serial", "file:${var.output_directory}.console.log"],
  ]
  communicator         = "ssh"
  ssh_username         = "root"
  ssh_private_key_file = var.ssh_private_key_file
  # Under emulation the first boot takes minutes.
  ssh_timeout      = "20m"
  shutdown_command = "systemctl poweroff"
  shutdown_timeout = "10m"
}

build {
  sources = ["source.amazon-ebs.fleet", "source.qemu.local"]

  provisioner "shell" {
    inline = ["mkdir -p ${local.payload}/packer"]
  }
  provisioner "file" {
    source      = var.ringfence_binary
    destination = "${local.payload}/ringfence"
  }
  provisioner "file" {
    source      = "../deploy"
    destination = local.payload
  }
  provisioner "file" {
    sources     = ["provision", "host-policy.toml", "host-addresses.txt"]
    destination = "${local.payload}/packer/"
  }
  # As root: sudo on the AMI (its user is admin), harmless as root on the local image.
  provisioner "shell" {
    execute_command  = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "PAYLOAD=${local.payload}",
      "RUNNER_USER=${var.runner_user}",
      "STANDIN_RUNNER=${var.standin_runner ? "1" : "0"}",
    ]
    scripts = [
      "provision/install-ringfence.sh",
      "provision/install-runner-hooks.sh",
      "provision/install-standin-runner.sh",
      "provision/check-image.sh",
    ]
  }
  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    inline          = ["rm -rf ${local.payload}"]
  }
}
