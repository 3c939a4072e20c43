"""The datasets kd_jax knows: what is known of each before reading it.

`DATASETS` maps a dataset's name (`config.dataset`) to its `DatasetInfo`:
classes, image shape, where its files may already be, the official files to
download (`REMOTES`), and the per-channel statistics the training step
normalises with. Re-exported by `kd_jax.data`, where the datasets are read.

Every checksum in `REMOTES` was copied from a published source or computed
from a copy of the published file, as noted there; none was made up. See
`kd_jax.download` for how they are checked (any one matching suffices).
"""

from __future__ import annotations

import dataclasses

from kd_jax import cifar
from kd_jax.download import Remote
from kd_jax.download import RemoteFile

# Where each checksum comes from:
#   file_md5: torchvision's datasets.MNIST and FashionMNIST `resources`,
#     CIFAR10 and CIFAR100 `tgz_md5`. member_md5: the same CIFAR classes'
#     `train_list` and `test_list` (MD5s of the extracted batch files).
#   file_sha256: TFDS url_checksums/mnist.txt and fashion_mnist.txt; Keras'
#     datasets.cifar10 and cifar100 `file_hash`.
#   payload_sha256, computed here (gunzip, then sha256sum):
#     Fashion-MNIST from Debian's dataset-fashion-mnist (0.0~git20200523.
#     55506a9-1). Its .gz files are upstream's with the gzip header rewritten
#     (file name dropped, mtime changed): the deflate data are identical, and
#     with upstream's header restored all four files match torchvision's MD5s
#     and TFDS' SHA-256s; the two label files also equal those in the
#     github.com/zalandoresearch/fashion-mnist repository (data/fashion/).
#     MNIST from the .gz files in the github.com/fgnt/mnist repository, which
#     match torchvision's MD5s and TFDS' SHA-256s; its train-images file
#     could not be read here, so that file has no payload checksum (a
#     re-compressed mirror of it is refused).
#     CIFAR: none (no copy of the archives here); an archive re-compressed or
#     re-packed by a mirror passes on the member MD5s.
REMOTES: dict[str, Remote] = {
    'mnist': Remote(
        base_url='https://ossci-datasets.s3.amazonaws.com/mnist/',
        files=(
            RemoteFile(
                'train-images-idx3-ubyte.gz',
                file_md5='f68b3c2dcbeaaa9fbdd348bbdeb94873',
                file_sha256='440fcabf73cc546fa21475e81ea370265605f56be210a40'
                '24d2ca8f203523609'),
            RemoteFile(
                'train-labels-idx1-ubyte.gz',
                payload_sha256='65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3d'
                'd2ef09a8a9eef7101c5',
                file_md5='d53e105ee54ea40749a09fcbcd1e9432',
                file_sha256='3552534a0a558bbed6aed32b30c495cca23d567ec52cac8'
                'be1a0730e8010255c'),
            RemoteFile(
                't10k-images-idx3-ubyte.gz',
                payload_sha256='0fa7898d509279e482958e8ce81c8e77db3f2f8254e26'
                '661ceb7762c4d494ce7',
                file_md5='9fb629c4189551a2d022fa330f9573f3',
                file_sha256='8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b8458'
                '4aec276f5a2dbc4e6'),
            RemoteFile(
                't10k-labels-idx1-ubyte.gz',
                payload_sha256='ff7bcfd416de33731a308c3f266cc351222c34898ecbe'
                'af847f06e48f7ec33f2',
                file_md5='ec29112dd5afa0611ce80d1b7f02629c',
                file_sha256='f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0def'
                'aefb259924204aec6'),
        )),
    'fashion_mnist': Remote(
        base_url='http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
        files=(
            RemoteFile(
                'train-images-idx3-ubyte.gz',
                payload_sha256='c59f468a2f672dc815687fe0f83887768d799fd8a3f32'
                '76145d20f83aa44d888',
                file_md5='8d4fb7e6c68d591d4c3dfef9ec88bf0d',
                file_sha256='3aede38d61863908ad78613f6a32ed271626dd12800ba26'
                '36569512369268a84'),
            RemoteFile(
                'train-labels-idx1-ubyte.gz',
                payload_sha256='bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246'
                '121d8633921760443d9',
                file_md5='25c81989df183df01b3e8a0aad5dffbe',
                file_sha256='a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1'
                'a3aa29af54cc90845'),
            RemoteFile(
                't10k-images-idx3-ubyte.gz',
                payload_sha256='5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1d'
                'bef5c9a5cd8815ce37b',
                file_md5='bef4ecab320f06d8554ea6380940ec79',
                file_sha256='346e55b948d973a97e58d2351dde16a484bd415d4595297'
                '633bb08f03db6a073'),
            RemoteFile(
                't10k-labels-idx1-ubyte.gz',
                payload_sha256='0402a96d92fd2663957122ceb108a494c5af83dab82d9'
                '2729df917d7dec38c34',
                file_md5='bb300cfdad3c16e7a12a480ee83cd310',
                file_sha256='67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35'
                'dfb1850b086bf8dd5'),
        )),
    'cifar10': Remote(
        base_url='https://www.cs.toronto.edu/~kriz/',
        files=(RemoteFile(
            'cifar-10-python.tar.gz',
            file_md5='c58f30108f718f92721af3b95e74349a',
            file_sha256='6d958be074577803d12ecdefd02955f39262c83c16fe9348329d'
            '7fe0b5c001ce',
            member_md5={
                'cifar-10-batches-py/data_batch_1':
                    'c99cafc152244af753f735de768cd75f',
                'cifar-10-batches-py/data_batch_2':
                    'd4bba439e000b95fd0a9bffe97cbabec',
                'cifar-10-batches-py/data_batch_3':
                    '54ebc095f3ab1f0389bbae665268c751',
                'cifar-10-batches-py/data_batch_4':
                    '634d18415352ddfa80567beed471001a',
                'cifar-10-batches-py/data_batch_5':
                    '482c414d41f54cd18b22e5b47cb7c3cb',
                'cifar-10-batches-py/test_batch':
                    '40351d587109b95175f43aff81a1287e',
            }),)),
    'cifar100': Remote(
        base_url='https://www.cs.toronto.edu/~kriz/',
        files=(RemoteFile(
            'cifar-100-python.tar.gz',
            file_md5='eb9058c3a382ffc7106e4002c42a8d85',
            file_sha256='85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef2'
            '9b855ba677a7',
            member_md5={
                'cifar-100-python/train': '16019d7e3df5f24257cddd939b257f8d',
                'cifar-100-python/test': 'f0ef6b0ae62326f3e7ffdfab6717acfc',
            }),)),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What is known about a dataset before reading it.

  Attributes:
    title: display name, e.g. 'Fashion-MNIST'.
    num_classes: number of classes.
    image_shape: (H, W, C) of one image.
    idx_dirs: directories probed for the four IDX files, in order ('~' is
      expanded).
    tfds_name: the TFDS builder name.
    install_hint: a command that installs the IDX files into `idx_dirs[0]`, or
      None when there is none.
    remote: the official files to download (`REMOTES`), or None.
    layout: the layout of the CIFAR python archive the data comes in, or None
      for IDX files.
    mean: per-channel mean of the training images in [0, 1], for
      `(x - mean) / std` in the training step; None: no normalisation.
    std: per-channel standard deviation, likewise.
  """

  title: str
  num_classes: int
  image_shape: tuple[int, int, int]
  idx_dirs: tuple[str, ...]
  tfds_name: str
  install_hint: str | None = None
  remote: Remote | None = None
  layout: cifar.Layout | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None


DATASETS: dict[str, DatasetInfo] = {
    'fashion_mnist': DatasetInfo(
        title='Fashion-MNIST',
        num_classes=10,
        image_shape=(28, 28, 1),
        # Keras' `fashion_mnist.load_data()` caches the same four .gz files.
        idx_dirs=('/usr/share/datasets/fashion-mnist',
                  '~/.keras/datasets/fashion-mnist'),
        tfds_name='fashion_mnist',
        install_hint='apt-get install dataset-fashion-mnist',
        remote=REMOTES['fashion_mnist'],
    ),
    'mnist': DatasetInfo(
        title='MNIST',
        num_classes=10,
        image_shape=(28, 28, 1),
        # No Debian package ships MNIST; the directory follows the
        # fashion-mnist package's layout. (Keras caches MNIST as one .npz.)
        idx_dirs=('/usr/share/datasets/mnist',),
        tfds_name='mnist',
        remote=REMOTES['mnist'],
    ),
    # mean, std: CIFAR-100's as RepDistiller and mdistiller normalise it
    # (dataset/cifar100.py); CIFAR-10's are its training images'
    # per-channel mean and standard deviation, as widely used.
    'cifar10': DatasetInfo(
        title='CIFAR-10', num_classes=10, image_shape=cifar.IMAGE_SHAPE,
        idx_dirs=(), tfds_name='cifar10', remote=REMOTES['cifar10'],
        layout=cifar.LAYOUTS['cifar10'], mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616)),
    'cifar100': DatasetInfo(
        title='CIFAR-100', num_classes=100, image_shape=cifar.IMAGE_SHAPE,
        idx_dirs=(), tfds_name='cifar100', remote=REMOTES['cifar100'],
        layout=cifar.LAYOUTS['cifar100'], mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761)),
}
