// SPDX-License-Identifier: MIT
pragma solidity 0.8.37;

import {ERC721} from "@openzeppelin/contracts/token/ERC721/ERC721.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC165} from "@openzeppelin/contracts/utils/introspection/IERC165.sol";
import {IERC4906} from "@openzeppelin/contracts/interfaces/IERC4906.sol";

/// @title GLISK: blind-box NFTs credited to a prompt author, revealed by a keeper.
/// @notice The interface GLISK users know (mint, BatchMinted, revealTokens, AlreadyRevealed,
/// isRevealed, nextTokenId), plus EIP-4906 metadata events so marketplaces refresh a token when
/// it is revealed, and `revealedAt` so a keeper can find the transaction that revealed a token
/// from the chain alone (the block, then that block's TokensRevealed log).
/// Payments: half of each mint is credited to the prompt author (pulled with
/// claimAuthorRewards), the rest is the treasury's. Season and royalty management of the
/// upstream contract are left out: the backend does not use them.
contract GliskNFT is ERC721, AccessControl, IERC4906 {
    bytes32 public constant KEEPER_ROLE = keccak256("KEEPER_ROLE");
    uint256 public constant MAX_BATCH_SIZE = 50;

    /// The id the next mint starts at (ids start at 1).
    uint256 public nextTokenId = 1;
    uint256 public mintPrice;
    uint256 public treasuryBalance;
    string private _placeholderURI;

    mapping(uint256 tokenId => address) private _promptAuthors;
    mapping(uint256 tokenId => string) private _tokenURIs;
    /// The block a token was revealed in; zero while unrevealed.
    mapping(uint256 tokenId => uint256) public revealedAt;
    mapping(address author => uint256) public authorClaimable;

    event BatchMinted(
        address indexed minter,
        address indexed promptAuthor,
        uint256 indexed startTokenId,
        uint256 quantity,
        uint256 totalPaid
    );
    event TokensRevealed(uint256[] tokenIds);
    event MintPriceUpdated(uint256 oldPrice, uint256 newPrice);
    event PlaceholderURIUpdated(string newURI);
    event AuthorClaimed(address indexed author, uint256 amount);
    event TreasuryWithdrawn(address indexed recipient, uint256 amount);

    error InvalidQuantity();
    error ExceedsMaxBatchSize();
    error InsufficientPayment();
    error InvalidPromptAuthor();
    error AlreadyRevealed(uint256 tokenId);
    error LengthMismatch();
    error EmptyURI(uint256 tokenId);
    error NoBalance();
    error TransferFailed();

    constructor(
        string memory name_,
        string memory symbol_,
        string memory placeholderURI_,
        uint256 mintPrice_,
        address admin,
        address keeper
    ) ERC721(name_, symbol_) {
        _placeholderURI = placeholderURI_;
        mintPrice = mintPrice_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(KEEPER_ROLE, keeper);
    }

    /// Mint `quantity` consecutive tokens to the caller, credited to `promptAuthor`.
    function mint(address promptAuthor, uint256 quantity) external payable {
        if (quantity == 0) revert InvalidQuantity();
        if (quantity > MAX_BATCH_SIZE) revert ExceedsMaxBatchSize();
        if (promptAuthor == address(0)) revert InvalidPromptAuthor();
        if (msg.value < mintPrice * quantity) revert InsufficientPayment();

        uint256 start = nextTokenId;
        // Advanced before any _safeMint callback, so a re-entering mint gets fresh ids.
        nextTokenId = start + quantity;
        uint256 authorShare = msg.value / 2;
        authorClaimable[promptAuthor] += authorShare;
        treasuryBalance += msg.value - authorShare;
        for (uint256 i = 0; i < quantity; ++i) {
            _promptAuthors[start + i] = promptAuthor;
            _safeMint(msg.sender, start + i);
        }
        emit BatchMinted(msg.sender, promptAuthor, start, quantity, msg.value);
    }

    /// Set each token's URI for good. Reverts AlreadyRevealed(tokenId) if any of them was
    /// revealed before (nothing of the batch is written then).
    function revealTokens(uint256[] calldata tokenIds, string[] calldata uris)
        external
        onlyRole(KEEPER_ROLE)
    {
        if (tokenIds.length != uris.length) revert LengthMismatch();
        for (uint256 i = 0; i < tokenIds.length; ++i) {
            uint256 tokenId = tokenIds[i];
            _requireOwned(tokenId);
            if (revealedAt[tokenId] != 0) revert AlreadyRevealed(tokenId);
            if (bytes(uris[i]).length == 0) revert EmptyURI(tokenId);
            revealedAt[tokenId] = block.number;
            _tokenURIs[tokenId] = uris[i];
            emit MetadataUpdate(tokenId);
        }
        emit TokensRevealed(tokenIds);
    }

    function isRevealed(uint256 tokenId) external view returns (bool) {
        return revealedAt[tokenId] != 0;
    }

    function tokenPromptAuthor(uint256 tokenId) external view returns (address) {
        _requireOwned(tokenId);
        return _promptAuthors[tokenId];
    }

    /// The placeholder until the token is revealed, then its own URI.
    function tokenURI(uint256 tokenId) public view override returns (string memory) {
        _requireOwned(tokenId);
        if (revealedAt[tokenId] == 0) return _placeholderURI;
        return _tokenURIs[tokenId];
    }

    function setPlaceholderURI(string calldata newURI) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _placeholderURI = newURI;
        emit PlaceholderURIUpdated(newURI);
        uint256 last = nextTokenId - 1;
        if (last > 0) emit BatchMetadataUpdate(1, last);
    }

    function setMintPrice(uint256 newPrice) external {
        if (!hasRole(DEFAULT_ADMIN_ROLE, msg.sender)) _checkRole(KEEPER_ROLE);
        emit MintPriceUpdated(mintPrice, newPrice);
        mintPrice = newPrice;
    }

    function claimAuthorRewards() external {
        uint256 amount = authorClaimable[msg.sender];
        authorClaimable[msg.sender] = 0;
        emit AuthorClaimed(msg.sender, amount);
        if (amount > 0) {
            (bool ok,) = msg.sender.call{value: amount}("");
            if (!ok) revert TransferFailed();
        }
    }

    function withdrawTreasury() external onlyRole(DEFAULT_ADMIN_ROLE) {
        uint256 amount = treasuryBalance;
        if (amount == 0) revert NoBalance();
        treasuryBalance = 0;
        emit TreasuryWithdrawn(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    function supportsInterface(bytes4 interfaceId)
        public
        view
        override(ERC721, AccessControl, IERC165)
        returns (bool)
    {
        return interfaceId == bytes4(0x49064906) || super.supportsInterface(interfaceId);
    }
}
